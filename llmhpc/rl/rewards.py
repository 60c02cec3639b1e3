"""Reward functions for verifiable tasks: plain callables `(completion text, example row) -> float`.

A GRPO or PPO run names its rewards (`correct`, `format`) or gives any callable by its Hydra `_target_` path, with
a weight each; `RewardSet` calls them on every completion and checks what they return, so a reward that raises or
returns something other than a finite number stops the run with a message naming it.

The final answer of a completion is read with the `math-verify` library (`math_verify.parse`): a `\\boxed{}`
answer first, else "The answer is N" / the last number or expression written; thousands separators, signs,
decimals, fractions and trailing units are understood, and two answers are compared as numbers
(`math_verify.verify`), so "1,250", "1250.0" and "\\boxed{1250}" all match an answer of 1250.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from llmhpc.data.arithmetic import parse_final_answer
from llmhpc.errors import InputError

RewardFn = Callable[[str, Mapping], float]
"""(completion text, the example it answers: a dict with at least 'answer' for the answer rewards) -> reward."""


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text)


def correct_answer(completion: str, example: Mapping) -> float:
    """1 when the completion's final answer equals the example's 'answer' as a number (or expression), else 0."""
    from math_verify import verify

    predicted = _parse(completion)
    return float(bool(predicted) and verify(_parse(str(example["answer"])), predicted))


def answer_format(completion: str, example: Mapping) -> float:
    """1 when the completion ends its reasoning the way the shipped task's solutions do ("The answer is N."),
    whatever N is; 0 otherwise. A small shaping reward next to `correct_answer`."""
    return float(parse_final_answer(completion) is not None)


REWARDS: dict[str, RewardFn] = {"correct": correct_answer, "format": answer_format}
"""Rewards chosen by name in a config."""


class RewardError(InputError):
    """A reward function failed or returned something that is not a finite number (the CLI prints it as one line
    naming the function and stops)."""


def resolve_reward(spec: str) -> RewardFn:
    """A reward by its name in REWARDS or by the dotted import path of a callable (what Hydra's `_target_` holds)."""
    if spec in REWARDS:
        return REWARDS[spec]
    if "." not in spec:
        raise ValueError(f"unknown reward {spec!r}; choose from {sorted(REWARDS)} or give a dotted path "
                         "module.function")
    from hydra.utils import get_method

    try:
        return get_method(spec)
    except Exception as e:  # hydra wraps import errors in its own types
        raise ValueError(f"reward {spec!r} cannot be imported: {e}") from None


@dataclass
class RewardSet:
    """Named reward functions with weights; the reward of a completion is the weighted sum."""

    functions: dict[str, RewardFn]
    weights: dict[str, float]

    @classmethod
    def from_specs(cls, specs: Mapping[str, float]) -> RewardSet:
        """{name or dotted path: weight} -> the set (e.g. {'correct': 1.0, 'format': 0.1})."""
        if not specs:
            raise ValueError("at least one reward is needed")
        return cls({name: resolve_reward(name) for name in specs}, {name: float(w) for name, w in specs.items()})

    def score(self, completions: Sequence[str], examples: Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
        """(total [N], per function [N, functions] in the set's order) for N completions and their examples."""
        per = torch.zeros(len(completions), len(self.functions), dtype=torch.float64)
        for j, (name, fn) in enumerate(self.functions.items()):
            for i, (completion, example) in enumerate(zip(completions, examples, strict=True)):
                try:
                    value = fn(completion, example)
                except Exception as e:
                    raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e} (on completion {i}: "
                                      f"{completion[:80]!r})") from e
                if isinstance(value, bool):
                    value = float(value)
                if not isinstance(value, int | float) or not math.isfinite(value):
                    raise RewardError(f"reward {name!r} returned {value!r} for completion {i}; a reward must return "
                                      "a finite number")
                per[i, j] = value
        weights = torch.tensor([self.weights[name] for name in self.functions], dtype=torch.float64)
        return per @ weights, per
