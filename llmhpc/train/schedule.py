"""Learning-rate schedules as pure functions of the step.

A schedule that depends only on the step number needs no state of its own in a checkpoint:
resuming at step N gives the same learning rate as the uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from llmhpc.config.schema import TrainerConfig


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (0-based).

    - cosine: linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`.
    - wsd: warmup, a stable plateau at 1, then linear decay to `min_lr_ratio` over the last
      `decay_fraction` of the run (warmup-stable-decay, as in MiniCPM / DeepSeek runs).
    - constant: warmup, then 1.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = cfg.max_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1 - (1 - floor) * progress
    raise ValueError(f"unknown trainer.schedule {cfg.schedule!r}; use cosine, wsd or constant")


def set_lr(
    param_groups: list[dict], step: int, cfg: TrainerConfig, scales: Sequence[float] | None = None
) -> float:
    """Set each param group's learning rate for `step` (the schedule's value times the group's scale, 1 by
    default); returns the schedule's value."""
    lr = cfg.lr * lr_factor(step, cfg)
    scales = scales or [1.0] * len(param_groups)
    if len(scales) != len(param_groups):
        raise ValueError(f"{len(scales)} learning-rate scales for {len(param_groups)} param groups")
    for group, scale in zip(param_groups, scales, strict=True):
        group["lr"] = lr * scale
    return lr
