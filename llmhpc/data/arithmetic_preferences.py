"""Preference pairs made from the arithmetic problems: a correct worked answer ranked above a flawed one.

The reward-model and DPO stages need ranked pairs whose ranking a program can verify, offline. Each problem of
`llmhpc.data.arithmetic` gives one pair: ``chosen`` is its worked solution; ``rejected`` is the same solution
made wrong in one of two ways a grader would catch:

- 'wrong_result' (3 in 4 pairs): the result of the last step and the final ``The answer is N.`` carry another
  number (off by a small amount, or by ten or a hundred, as slips of a digit or a carry are);
- 'no_answer' (1 in 4): the steps are right but the final answer sentence is missing, so the answer cannot be
  read off (the task's format convention is broken).

Train pairs come from the training problems and eval pairs from the held-out pool, so the splits share no
question and no arithmetic (`train_eval_split`). Every draw comes from a ``random.Random`` of the seed.

`sampled_pair_rows` makes pairs of another kind, from a policy's own sampled answers ranked by their final number
(`llmhpc reward sampled_from=<policy>`): a reward model that is to judge that policy then learns its mistakes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from llmhpc.data.arithmetic import ANSWER_SENTENCE, Problem, parse_final_answer

FLAWS = ("wrong_result", "no_answer")
_SLIPS = (1, 2, 3, 10, 100)


def wrong_number(answer: int, rng: random.Random) -> int:
    """A plausible wrong answer: `answer` moved by a small amount, or by ten or a hundred; never negative."""
    while True:
        candidate = answer + rng.choice(_SLIPS) * rng.choice((-1, 1))
        if candidate >= 0 and candidate != answer:
            return candidate


def flawed_solution(problem: Problem, flaw: str, rng: random.Random) -> str:
    """The problem's worked solution with `flaw` (one of FLAWS) put in."""
    lines = problem.solution.split("\n")
    final = ANSWER_SENTENCE.format(answer=problem.answer)
    if lines[-1] != final:
        raise ValueError(f"solution of {problem.question!r} does not end with {final!r}")
    if flaw == "no_answer":
        return "\n".join(lines[:-1])
    if flaw != "wrong_result":
        raise ValueError(f"flaw {flaw!r}; choose from {FLAWS}")
    wrong = str(wrong_number(int(problem.answer), rng))
    result = re.compile(rf"(?<!\d){re.escape(problem.answer)}(?!\d)")
    # The last step states the result last (e.g. '774 + 246 = 1020.' or '...= 10 stickers are left over.').
    found = list(result.finditer(lines[-2]))
    if found:
        at = found[-1]
        lines[-2] = lines[-2][: at.start()] + wrong + lines[-2][at.end():]
    lines[-1] = ANSWER_SENTENCE.format(answer=wrong)
    return "\n".join(lines)


def preference_row(problem: Problem, rng: random.Random) -> dict[str, Any]:
    """One JSONL row: prompt, chosen, rejected (strings), the answer, the problem's kind and the flaw."""
    flaw = "no_answer" if rng.random() < 0.25 else "wrong_result"
    rejected = flawed_solution(problem, flaw, rng)
    assert parse_final_answer(rejected) != problem.answer  # noqa: S101 - the pair's ranking must be verifiable
    return {"prompt": problem.question, "chosen": problem.solution, "rejected": rejected, "answer": problem.answer,
            "kind": problem.kind, "flaw": flaw}


def preference_rows(problems: Sequence[Problem], seed: int) -> list[dict[str, Any]]:
    """A pair per problem, in order, reproducible from `seed`."""
    rng = random.Random(f"preferences-{seed}")
    return [preference_row(problem, rng) for problem in problems]


def sampled_pair_rows(problems: Sequence[Problem], samples: Sequence[Sequence[str]],
                      is_right: Callable[[Problem, str], bool]) -> list[dict[str, Any]]:
    """Pairs from a policy's own answers (`samples[i]`: those it sampled for `problems[i]`): each distinct wrong
    answer ranked below a right one (the right samples taken in turn; the worked solution when none was right).
    A reward model trained on the shipped pairs learns generated mistakes; these teach it the mistakes the policy
    it will judge makes, in that policy's wording. A problem all of whose samples are right gives no pair."""
    if len(samples) != len(problems):
        raise ValueError(f"{len(problems)} problems need as many sample lists, got {len(samples)}")
    rows = []
    for problem, answers in zip(problems, samples, strict=True):
        verdicts = {answer: is_right(problem, answer) for answer in answers}  # each distinct answer graded once
        right = [a for a, ok in verdicts.items() if ok]
        wrong = [a for a, ok in verdicts.items() if not ok]
        chosen = right or [problem.solution]
        for index, rejected in enumerate(wrong):
            rows.append({"prompt": problem.question, "chosen": chosen[index % len(chosen)], "rejected": rejected,
                         "answer": problem.answer, "kind": problem.kind,
                         "flaw": "sampled" if right else "sampled_none_right"})
    return rows
