"""Sharded data parallelism with FSDP2 (`fully_shard`), and HSDP on a 2-D mesh.

Each transformer block is its own FSDP unit, so only one block's full weights are gathered at a
time; the root call then covers what is left (embedding, final norm, output head). Parameters
become DTensors sharded on dim 0, which DCP saves and reloads under any other layout.

Mixed precision (`precision=bf16`, and `fp8`, which runs as bf16 plus float8 block linears) follows
torchtitan's policy: the sharded parameters, their gradients and the AdamW state stay fp32 (master
weights); FSDP casts each shard to bf16 before the all-gather, so the gathered parameters, the forward and
backward and the unsharded gradients are bf16 (half the all-gather bytes and gathered memory), and casts the
unsharded gradients to fp32 for the reduce-scatter (sums over ranks in fp32, accumulated into fp32 shards).
FSDP also casts each unit's floating-point inputs to bf16, so under FSDP the residual stream between blocks is
bf16 (RMSNorm still normalizes in fp32). Float8 weights (`enable_fsdp_float8_all_gather`) are cast to float8
from the fp32 shard by torchao's all-gather hooks, whatever `param_dtype` is; the gathered float8 weight then
reports bf16 as its high-precision dtype.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from llmhpc.config.schema import ParallelConfig

LOW_PRECISION = ("bf16", "fp8")
"""`precision.name` values whose FSDP units gather parameters in bf16 (fp8: the non-float8 ones)."""


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for `precision.name`: bf16 gathers with fp32 gradient reduction, or plain fp32."""
    if precision in LOW_PRECISION:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision != "fp32":
        raise ValueError(f"no FSDP mixed-precision policy for precision={precision!r}")
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, precision: str = "fp32") -> nn.Module:
    """Shard `model` over `mesh` in place: 1-D ('dp_shard') for FSDP, 2-D ('dp_replicate', 'dp_shard') for HSDP.

    `precision` (`precision.name`) picks the mixed-precision policy (`mixed_precision_policy`). The root keeps
    its parameters gathered after forward: backward needs them at once (the output head comes first), so
    resharding them would only add an all-gather.
    """
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    mp = mixed_precision_policy(precision)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        last = index == len(blocks) - 1
        fully_shard(
            block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward and not last, offload_policy=offload,
            mp_policy=mp,
        )
    fully_shard(model, mesh=mesh, reshard_after_forward=False, offload_policy=offload, mp_policy=mp)
    return model


@contextmanager
def parameters_gathered(model: nn.Module) -> Iterator[GatherTiming]:
    """Keep every FSDP2 unit of `model` unsharded for the duration: gathered once on entry, resharded on exit.

    Generation runs one forward per new token; left to itself FSDP2 would all-gather each block's weights
    before every one of them and free them after. Inside this context those forwards find the weights already
    gathered. Yields a `GatherTiming` whose `seconds` is the time the gather took (0 for a model without FSDP).
    Costs one unsharded model per rank while inside.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    timing = GatherTiming()
    if not units:
        yield timing
        return
    began = time.perf_counter()
    saved = [all(g._reshard_after_forward for g in unit._get_fsdp_state()._fsdp_param_groups) for unit in units]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    timing.seconds = time.perf_counter() - began
    try:
        yield timing
    finally:
        for unit, flag in zip(units, saved, strict=True):
            unit.set_reshard_after_forward(flag, recurse=False)
            unit.reshard()


@dataclass
class GatherTiming:
    """How long `parameters_gathered` took to gather the parameters."""

    seconds: float = 0.0
