"""Exact-answer accuracy: ask each held-out question, decode greedily, compare the final number with the answer.

A question is a JSONL row with 'prompt' (text) or 'messages' (a chat; the turns up to the last user turn are
asked) and 'answer' (a number). It is rendered with the model's own chat template when the tokenizer has one,
so a chat model is asked the way it was trained. The reply's answer is the last number it writes (thousands
separators and a sign allowed). A reply cut off by max_new_tokens is graded on the last number it got to write
(usually an intermediate one), and the share of such replies is reported as 'truncated'.
"""

from __future__ import annotations

import json
import re
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


def accuracy(model: torch.nn.Module, tokenizer, questions: list[Question], *, max_new_tokens: int = 128,
             batch_size: int = 8) -> dict[str, float]:
    """{'accuracy', 'truncated', 'questions'} of greedy replies, `batch_size` of them decoding at once (the rollout
    engine: a finished reply's row is taken by the next question at once)."""
    eos = tokenizer.eos_token_id
    engine = RolloutEngine(model, batch_size=batch_size, eos_token_ids=[] if eos is None else [eos])
    replies = engine.generate([prompt_ids(tokenizer, q) for q in questions],
                              SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    correct = truncated = 0
    for question, reply in zip(questions, replies, strict=True):
        ended = reply.finish_reason == "stop"
        truncated += not ended
        got = last_number(tokenizer.decode(reply.tokens[:-1] if ended else reply.tokens, skip_special_tokens=True))
        correct += got is not None and got == last_number(question.answer)
    n = len(questions)
    return {"accuracy": correct / n, "truncated": truncated / n, "questions": float(n)}
