"""Rewards (`llmhpc.rl.rewards`): the answer forms a verifiable reward must accept, the wrong ones it must reject,
and the one-line errors of a broken reward function."""

from __future__ import annotations

import math

import pytest
import torch

from llmhpc.rl.rewards import RewardError, RewardSet, answer_format, correct_answer, resolve_reward


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("7 * 228 = 1596.\nThe answer is 1596.", "1596"),
        ("The shop has 1,250 pencils now.", "1250"),  # thousands separator
        ("The total is $1,234,567.", "1234567"),
        ("So she ends with -3 apples.", "-3"),  # sign
        ("Each one costs 2.50 dollars.", "2.5"),  # decimals, equal as numbers
        ("It takes 180 / 60 = 3, so 3 hours.", "3"),  # trailing unit
        ("The speed is 12 km/h.", "12"),
        ("Therefore the answer is \\boxed{42}, not 7.", "42"),  # a boxed answer wins over a later number
        ("Half of it: \\boxed{\\frac{5}{2}}", "2.5"),
    ],
)
def test_correct_answers_are_accepted_in_every_form(completion: str, answer: str):
    assert correct_answer(completion, {"answer": answer}) == 1.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("The answer is 125.", "1250"),
        ("It takes 3 hours because 180 km at 60 km per hour is 180.", "3"),  # the last number is an intermediate
        ("I am not sure.", "3"),  # no number at all
        ("The answer is \\boxed{41}.", "42"),
        ("She has 3 apples left.", "-3"),
    ],
)
def test_wrong_or_missing_answers_are_rejected(completion: str, answer: str):
    assert correct_answer(completion, {"answer": answer}) == 0.0


def test_format_reward_wants_the_shipped_answer_sentence():
    assert answer_format("3 + 4 = 7.\nThe answer is 7.", {}) == 1.0
    assert answer_format("Answer: 7", {}) == 0.0 and answer_format("the answer is 7", {}) == 0.0


def test_weighted_rewards_add_up_and_keep_each_function():
    rewards = RewardSet.from_specs({"correct": 1.0, "llmhpc.rl.rewards.answer_format": 0.25})
    completions = ["The answer is 12.", "It is 12", "The answer is 13."]
    total, per = rewards.score(completions, [{"answer": "12"}] * 3)
    assert per.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    assert torch.allclose(total, torch.tensor([1.25, 1.0, 0.25], dtype=torch.float64))


def test_a_broken_reward_stops_the_run_naming_it():
    def raises(completion, example):
        raise KeyError("answer")

    for bad, message in ((raises, "reward 'raises' raised KeyError"),
                         (lambda c, e: None, "returned None"), (lambda c, e: math.nan, "returned nan"),
                         (lambda c, e: "1", "returned '1'")):
        rewards = RewardSet({"raises" if bad is raises else "bad": bad}, {"raises": 1.0, "bad": 1.0})
        with pytest.raises(RewardError, match=message):
            rewards.score(["The answer is 1."], [{"answer": "1"}])
    with pytest.raises(ValueError, match="unknown reward 'corect'; choose from"):
        resolve_reward("corect")
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_reward("llmhpc.rl.rewards.no_such_reward")
