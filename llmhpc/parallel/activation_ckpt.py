"""Activation checkpointing: blocks drop their activations in forward and recompute them in backward.

The composable `checkpoint` API is used (not `checkpoint_wrapper`) because it leaves module names
unchanged, so checkpoints saved with and without activation checkpointing share parameter names.

Modes:
- 'none': every activation is kept for backward.
- 'selective': every other transformer block (0, 2, 4, ...) is recomputed; about half the
  activation memory of the blocks is saved for about half the recompute cost of 'full'.
- 'full': every block is recomputed; only the block inputs stay alive between forward and
  backward (one extra forward per step, the least activation memory).
"""

from __future__ import annotations

from torch import nn


def blocks_to_checkpoint(n_blocks: int, mode: str) -> list[int]:
    """Indices of the blocks that `mode` recomputes."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_blocks))
    if mode == "selective":
        return list(range(0, n_blocks, 2))
    raise ValueError(f"unknown activation checkpointing mode {mode!r}; expected none, selective or full")


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint the blocks of `model.layers` that `mode` selects, in place; returns the model."""
    blocks = list(model.layers.values())
    if mode == "none":
        return model
    from torch.distributed._composable import checkpoint

    for index in blocks_to_checkpoint(len(blocks), mode):
        checkpoint(blocks[index])
    return model
