"""Reward functions the GRPO tests name by dotted path (`reward=[tests.grpo_rewards.odd_length]`), as users name
their own: a tiny random model never answers arithmetic right, so the tests reward something it does vary."""

from __future__ import annotations


def odd_length(completion: str, example: dict) -> float:
    """1 for an answer of an odd number of characters: about half of a random model's answers."""
    return float(len(completion) % 2)


def broken(completion: str, example: dict) -> float:
    """A reward with a bug: it fails on every answer."""
    raise KeyError("score")
