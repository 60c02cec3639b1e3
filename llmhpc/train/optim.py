"""AdamW with the usual LLM parameter grouping.

Weight decay is applied to matrices (linear and embedding weights) and not to norm gains or
biases, as in every Llama-family recipe. The fused kernel is used where PyTorch has one for
the device (CUDA, and CPU since 2.4), since it is the fastest correct implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from llmhpc.config.schema import TrainerConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed (ndim >= 2) and not decayed (norms, biases)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (lr is set per step by the schedule)."""
    groups = [g for g in parameter_groups(model, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True
    )
