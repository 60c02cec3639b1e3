"""Sharded data parallelism with FSDP2 (`fully_shard`), and HSDP on a 2-D mesh.

Each transformer block is its own FSDP unit, so only one block's full weights are gathered at a
time; the root call then covers what is left (embedding, final norm, output head). Parameters
become DTensors sharded on dim 0, which DCP saves and reloads under any other layout.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from llmhpc.config.schema import ParallelConfig


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig) -> nn.Module:
    """Shard `model` over `mesh` in place: 1-D ('dp_shard') for FSDP, 2-D ('dp_replicate', 'dp_shard') for HSDP.

    The root keeps its parameters gathered after forward: backward needs them at once (the output
    head comes first), so resharding them would only add an all-gather.
    """
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        last = index == len(blocks) - 1
        fully_shard(
            block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward and not last, offload_policy=offload
        )
    fully_shard(model, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    return model
