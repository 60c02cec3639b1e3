"""Exact-answer accuracy: ask each held-out question, decode greedily, compare the final number with the answer.

A question is a JSONL row with 'prompt' (text) or 'messages' (a chat; the turns up to the last user turn are
asked) and 'answer' (a number). It is rendered with the model's own chat template when the tokenizer has one,
so a chat model is asked the way it was trained. The reply's answer is the last number it writes (thousands
separators and a sign allowed). A reply cut off by max_new_tokens is graded on the last number it got to write
(usually an intermediate one), and the share of such replies is reported as 'truncated'. Best-of-n
(`best_of_n_accuracy`) samples n replies per question and keeps the one a reward model scores highest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from llmhpc.errors import InputError
from llmhpc.rl.rollout import RolloutEngine
from llmhpc.rl.sampling import SamplingParams

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class Question:
    """One held-out question and the number that answers it."""

    chat: tuple[tuple[str, str], ...]
    """(role, content) turns asked, ending with the user's question."""
    answer: str
    """The expected final number, as text."""


def last_number(text: str) -> Fraction | None:
    """The last number written in `text` (e.g. '1,250', '-3', '2.5'), exactly; None when there is none."""
    found = _NUMBER.findall(text)
    return Fraction(found[-1].replace(",", "")) if found else None


def read_questions(path: str | Path, limit: int = 0) -> list[Question]:
    """Questions from a JSONL file of rows with 'prompt' or 'messages' and 'answer' (the first `limit`; 0: all)."""
    return [question for question, _ in read_question_rows(path, limit)]


def read_question_rows(path: str | Path, limit: int = 0) -> list[tuple[Question, dict]]:
    """(question, the row it came from) for the rows of a JSONL file (`read_questions`); rewards see the row."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: question file not found; give a .jsonl file of rows with prompt and answer")
    questions = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                questions.append((question_from_row(row), row))
            except (ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{path}, line {number}: not a question row ({exc}); each line needs 'prompt' (or "
                                 "'messages') and 'answer'") from None
            if limit and len(questions) == limit:
                break
    if not questions:
        raise InputError(f"{path}: holds no questions")
    return questions


def question_from_row(row: dict) -> Question:
    """A `Question` from one row: 'prompt' text or 'messages' (cut after the last user turn), and 'answer'."""
    if "messages" in row:
        turns = [(m["role"], m["content"]) for m in row["messages"]]
        last_user = max(i for i, (role, _) in enumerate(turns) if role == "user")
        chat = tuple(turns[: last_user + 1])
    else:
        chat = (("user", str(row["prompt"])),)
    answer = str(row["answer"])
    if last_number(answer) is None:
        raise ValueError(f"answer {answer!r} holds no number")
    return Question(chat, answer)


def prompt_ids(tokenizer, question: Question) -> list[int]:
    """The question's tokens as the model is asked: its chat template (generation prompt added) when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": content} for role, content in question.chat]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n".join(content for _, content in question.chat))


def _replies(model: torch.nn.Module, tokenizer, questions: list[Question], params: SamplingParams, batch_size: int,
             n: int = 1) -> list[tuple[str, bool]]:
    """(reply text, whether it ended by itself) for each question's n samples, question by question; request
    q * n + i draws sample i of question q, so a question's samples do not depend on the batch."""
    eos = tokenizer.eos_token_id
    engine = RolloutEngine(model, batch_size=batch_size, eos_token_ids=[] if eos is None else [eos])
    prompts = [prompt_ids(tokenizer, q) for q in questions for _ in range(n)]
    out = []
    for reply in engine.generate(prompts, params):
        ended = reply.finish_reason == "stop"
        out.append((tokenizer.decode(reply.tokens[:-1] if ended else reply.tokens, skip_special_tokens=True), ended))
    return out


def is_right(question: Question, reply: str) -> bool:
    """Whether the reply's last number is the question's answer."""
    got = last_number(reply)
    return got is not None and got == last_number(question.answer)


def accuracy(model: torch.nn.Module, tokenizer, questions: list[Question], *, max_new_tokens: int = 128,
             batch_size: int = 8, scorer: Callable[[list, list[str]], list[float]] | None = None) -> dict[str, float]:
    """{'accuracy', 'truncated', 'questions'} of greedy replies, `batch_size` of them decoding at once (the rollout
    engine: a finished reply's row is taken by the next question at once). With a `scorer` (a reward model, as
    for best-of-n) also 'judge_score': its mean score of the replies, what RLHF against it is meant to raise."""
    replies = _replies(model, tokenizer, questions, SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                       batch_size)
    n = len(questions)
    numbers = {"accuracy": sum(is_right(q, text) for q, (text, _) in zip(questions, replies, strict=True)) / n,
               "truncated": sum(not ended for _, ended in replies) / n, "questions": float(n)}
    if scorer is not None:
        numbers["judge_score"] = sum(scorer(_chats(questions), [text for text, _ in replies])) / n
    return numbers


def _chats(questions: list[Question], n: int = 1) -> list[list[dict[str, str]]]:
    """Each question's turns as a message list (what a reward model's scorer takes), repeated n times in a row."""
    return [[{"role": role, "content": content} for role, content in q.chat] for q in questions for _ in range(n)]


def best_of_n_accuracy(model: torch.nn.Module, tokenizer, questions: list[Question],
                       scorer: Callable[[list, list[str]], list[float]], *, n: int, temperature: float = 0.7,
                       max_new_tokens: int = 128, batch_size: int = 8, seed: int = 0) -> dict[str, float]:
    """Best-of-n sampling judged by a reward model: n replies per question sampled at `temperature`, each scored by
    `scorer(prompts, replies)` (prompts as message lists, e.g. `llmhpc.rl.reward_model.RewardScorer`), the best
    scored kept. Returns {'accuracy': of the kept replies, 'sample_accuracy': of all samples (what one sample
    scores), 'any_right': share of questions with a right sample among the n (the ceiling), 'questions'}."""
    replies = [text for answers in sampled_replies(model, tokenizer, questions, n=n, temperature=temperature,
                                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
               for text in answers]
    return grade_best_of_n(questions, replies, scorer(_chats(questions, n), replies), n)


def sampled_replies(model: torch.nn.Module, tokenizer, questions: list[Question], *, n: int, temperature: float,
                    max_new_tokens: int = 128, batch_size: int = 8, seed: int = 0) -> list[list[str]]:
    """Each question's n replies sampled at `temperature`, reproducibly: sample i of question q draws from request
    q * n + i of `seed`'s streams, whatever the batch size."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    replies = [text for text, _ in _replies(model, tokenizer, questions, params, batch_size, n)]
    return [replies[i * n:(i + 1) * n] for i in range(len(questions))]


def grade_best_of_n(questions: list[Question], replies: list[str], scores: list[float], n: int) -> dict[str, float]:
    """`best_of_n_accuracy`'s numbers from n replies per question (question by question) and their scores; a tie
    keeps the first of the best."""
    if len(replies) != len(questions) * n or len(scores) != len(replies):
        raise ValueError(f"{len(questions)} questions x {n} need as many replies and scores, got {len(replies)} "
                         f"replies, {len(scores)} scores")
    kept = right = any_right = 0
    for index, question in enumerate(questions):
        span = range(index * n, (index + 1) * n)
        verdicts = [is_right(question, replies[i]) for i in span]
        kept += verdicts[max(range(n), key=lambda i: scores[span[i]])]
        right += sum(verdicts)
        any_right += any(verdicts)
    total = len(questions)
    return {"accuracy": kept / total, "sample_accuracy": right / (total * n), "any_right": any_right / total,
            "questions": float(total)}
