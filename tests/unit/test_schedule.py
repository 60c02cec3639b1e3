"""Learning-rate schedules: warmup, cosine floor, WSD plateau and decay."""

from __future__ import annotations

import math

import pytest

from llmhpc.config import TrainerConfig
from llmhpc.train.schedule import lr_factor


def test_cosine_warmup_then_decay_to_floor():
    cfg = TrainerConfig(max_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    midpoint = 10 + 45
    assert lr_factor(midpoint, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_is_flat_then_linear():
    cfg = TrainerConfig(max_steps=100, warmup_steps=5, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_factor(s, cfg) for s in (5, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(90, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0)


def test_constant_after_warmup():
    cfg = TrainerConfig(max_steps=10, warmup_steps=2, schedule="constant")
    assert [lr_factor(s, cfg) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
