"""One candidate layout, in the terms the memory and time models need.

`Layout.of(cfg, world)` goes through the same `validate` the launcher uses, so the planner never
calls a layout valid that `llmhpc pretrain` would refuse; the models themselves also accept
layouts outside llmhpc's rules (e.g. Megatron's DDP + pipeline runs) for comparisons.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmhpc.config.layout import micro_batch_size, stages_per_rank, validate_layout
from llmhpc.config.schema import Config
from llmhpc.config.validate import validate

RECOMPUTE_FRACTION = {"none": 0.0, "selective": 0.5, "full": 1.0}
"""Share of blocks whose activations are recomputed: 'selective' checkpoints blocks 0, 2, 4, ...
(llmhpc.parallel.activation_ckpt), 'full' all of them."""


@dataclass(frozen=True)
class Layout:
    """Degrees, schedule and per-rank batch of one run."""

    dp_replicate: int = 1
    """Replicated data-parallel degree (DDP, or the outer dimension of HSDP)."""
    dp_shard: int = 1
    """Sharded data-parallel degree (FSDP2 / ZeRO group)."""
    tp: int = 1
    """Tensor (+ sequence) parallel degree."""
    pp: int = 1
    """Pipeline ranks."""
    pp_schedule: str = "1f1b"
    """gpipe, 1f1b, interleaved_1f1b or zbv."""
    stages_per_rank: int = 1
    """Virtual pipeline stages per rank (v)."""
    recompute: float = 0.0
    """Share of blocks recomputed in backward (0 none, 0.5 selective, 1 full)."""
    micro_batch: int = 1
    """Sequences per micro-batch and data-parallel rank."""
    engine: str = "torch"
    """'torch' (FSDP2/DDP/HSDP) or 'deepspeed' (ZeRO over all ranks)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (engine=deepspeed only)."""
    reshard_after_forward: bool = True
    """FSDP gathers each block's weights again in backward."""
    compile: bool = False
    """torch.compile fuses the elementwise kernels."""
    loss_parallel: bool = False
    """Under TP, the logits and the cross entropy stay sharded on the vocabulary (parallel.loss_parallel)."""

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def ac_name(self) -> str:
        names = {v: k for k, v in RECOMPUTE_FRACTION.items()}
        return names.get(self.recompute, f"{self.recompute:.2f}")

    def describe(self) -> str:
        """Compact label, e.g. 'dp_shard=8 tp=4 pp=2(1f1b) mb=1 ac=full'."""
        parts = []
        if self.dp_replicate > 1:
            parts.append(f"dp_rep={self.dp_replicate}")
        if self.dp_shard > 1:
            parts.append(f"dp_shard={self.dp_shard}")
        if self.tp > 1:
            parts.append(f"tp={self.tp}" + ("(loss_parallel)" if self.loss_parallel else ""))
        if self.pp > 1:
            v = f"x{self.stages_per_rank}" if self.stages_per_rank > 1 else ""
            parts.append(f"pp={self.pp}{v}({self.pp_schedule})")
        if self.engine == "deepspeed":
            parts.append(f"zero{self.zero_stage}")
        parts.append(f"mb={self.micro_batch} ac={self.ac_name}")
        return " ".join(parts or ["single"])

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> Layout:
        """The layout `cfg.parallel` describes on `world_size` GPUs; `ConfigError` (one line) if llmhpc
        would refuse it."""
        validate(cfg)
        dims = validate_layout(cfg.parallel, world_size, cfg.model, cfg.trainer)
        p = cfg.parallel
        return cls(dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp, p.pp_schedule,
                   stages_per_rank(p) if dims.pp > 1 else 1, RECOMPUTE_FRACTION[p.ac],
                   micro_batch_size(cfg.trainer, p, dims),
                   p.engine, p.zero_stage, p.reshard_after_forward, p.compile, p.loss_parallel)


def with_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of `cfg` whose parallel section and micro-batch describe `layout` (for validation and reports)."""
    ac = layout.ac_name if layout.recompute in RECOMPUTE_FRACTION.values() else "none"
    parallel = dataclasses.replace(
        cfg.parallel, dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp, pp=layout.pp,
        pp_schedule=layout.pp_schedule, pp_stages_per_rank=layout.stages_per_rank if layout.pp > 1 else None,
        ac=ac, engine=layout.engine, zero_stage=layout.zero_stage, compile=layout.compile,
        loss_parallel=layout.loss_parallel,
    )
    trainer = dataclasses.replace(cfg.trainer, micro_batch_size=layout.micro_batch)
    return dataclasses.replace(cfg, parallel=parallel, trainer=trainer)
