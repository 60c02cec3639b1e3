"""The frozen base projection's matmul, for a plain weight or a 4-bit NF4 one (QLoRA).

Kept apart from `llmhpc.peft.nf4` (which quantizes a model's adapted projections and so needs `llmhpc.peft.lora`)
because `LoRALinear.forward` itself calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmhpc.models.adapters import dequantize_nf4, is_nf4


class _FrozenNF4Linear(torch.autograd.Function):
    """x W^T for a frozen NF4 W: W is dequantized for the matmul and again for the input's gradient, so only the
    NF4 bytes stay alive between forward and backward (autograd would otherwise keep the dense copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight  # not save_for_backward: a frozen tensor subclass, never modified in place
        return F.linear(x, dequantize_nf4(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ dequantize_nf4(ctx.weight, grad.dtype), None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for a frozen base weight, plain or NF4 (QLoRA)."""
    return _FrozenNF4Linear.apply(x, weight) if is_nf4(weight) else F.linear(x, weight)
