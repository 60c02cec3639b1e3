"""Sums over the data-parallel ranks, for the few values the loop must agree on globally.

The token count that normalizes the loss, the reported loss and the gradient norm must be global
values so that every rank takes the same decision (skip a non-finite step or not) and the loss
equals the single-process loss of the same global batch. Without data parallelism every method
is the identity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class DataParallelReducer:
    """All-reduces over the 'dp' sub-mesh (or does nothing for one data-parallel rank)."""

    def __init__(self, dp_mesh: DeviceMesh | None, device: torch.device) -> None:
        self.device = device
        self.group = dp_mesh.get_group() if dp_mesh is not None and dp_mesh.size() > 1 else None
        self.size = dp_mesh.size() if self.group is not None else 1

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over the dp ranks (a new tensor; the input is left alone)."""
        out = value.detach().clone()
        if self.group is not None:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def sum_ints(self, *values: int) -> list[int]:
        """Sums of Python ints over the dp ranks, in one collective."""
        if self.group is None:
            return list(values)
        return [int(v) for v in self.sum(torch.tensor(values, dtype=torch.int64, device=self.device)).tolist()]

    @staticmethod
    def full(value: torch.Tensor) -> torch.Tensor:
        """A plain tensor from a possibly sharded one (a DTensor gradient norm under FSDP)."""
        from torch.distributed.tensor import DTensor

        return value.full_tensor() if isinstance(value, DTensor) else value
