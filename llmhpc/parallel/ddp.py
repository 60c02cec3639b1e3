"""Replicated data parallelism (DDP) through the composable `replicate` API.

`replicate` keeps the model's class and module names (unlike wrapping it in
`DistributedDataParallel`), so the loss code and checkpoint keys do not change. Gradients are
all-reduced (averaged) across the replicas during backward.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Replicate `model` over the 1-D 'dp_replicate' mesh in place; returns the model."""
    from torch.distributed._composable import replicate

    replicate(model, device_mesh=mesh)
    return model
