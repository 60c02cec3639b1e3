"""Reward functions the GRPO tests name by dotted path (`reward=[tests.grpo_rewards.odd_length]`), as users name
their own: a tiny random model never answers arithmetic right, so the tests reward something it does vary."""

from __future__ import annotations


def odd_length(completion: str, example: dict) -> float:
    """1 for an answer of an odd number of characters: about half of a random model's answers."""
    return float(len(completion) % 2)


def broken(completion: str, example: dict) -> float:
    """A reward with a bug: it fails on every answer."""
    raise KeyError("score")


def odd_length_unless_even_answer(completion: str, example: dict) -> float:
    """`odd_length`, except that a problem whose answer is even scores 1 for every answer: its group teaches
    nothing, so dynamic sampling drops it and each rank needs its own number of sampling rounds."""
    return 1.0 if int(example["answer"]) % 2 == 0 else odd_length(completion, example)
