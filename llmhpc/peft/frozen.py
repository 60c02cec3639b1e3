"""The frozen base projection's matmul, for a plain weight or a 4-bit NF4 one (QLoRA).

Kept apart from `llmhpc.peft.nf4` (which quantizes a model's adapted projections and so needs `llmhpc.peft.lora`)
because `LoRALinear.forward` itself calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmhpc.models.adapters import dequantize_nf4, is_nf4, is_sharded_nf4


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
    """F.linear(x, weight) for a frozen base weight, plain or NF4 (QLoRA), whole or a tensor-parallel DTensor."""
    if is_nf4(weight):
        return _FrozenNF4Linear.apply(x, weight)
    if is_sharded_nf4(weight):
        return _sharded_nf4_linear(x, weight)
    return F.linear(x, weight)


def _sharded_nf4_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T under tensor parallel for an NF4 W sharded on its rows (column-wise parallel, x replicated) or on
    its columns (row-wise parallel, x sharded on features).

    DTensor's matmul cannot see inside an NF4 shard, so each rank multiplies its own shard and the result gets
    the placement DTensor would have given: column-wise, the output sharded on features and x's local gradient a
    partial sum (reduced where x was replicated); row-wise, a partial-sum output (reduced by the style)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    (placement,) = weight.placements
    (x_placement,) = x.placements
    rowwise = placement == Shard(1)
    if x_placement != (Shard(x.ndim - 1) if rowwise else Replicate()):
        raise ValueError(f"an NF4 weight placed {placement} needs its input placed "
                         f"{'Shard(-1)' if rowwise else 'Replicate()'}, got {x_placement}")
    x_local = x.to_local() if rowwise else x.to_local(grad_placements=[Partial()])
    out = _FrozenNF4Linear.apply(x_local, weight.to_local())
    return DTensor.from_local(out, weight.device_mesh, [Partial() if rowwise else Shard(out.ndim - 1)],
                              run_check=False)
