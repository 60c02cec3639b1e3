"""The parallel layout of a run: validated degrees and the DeviceMesh they name.

Every rule a layout must satisfy is checked here from the config and the world size alone, so a
bad layout stops before any process allocates memory or joins a process group. It is part of the
config layer (it imports nothing of llmhpc above `config/`); torch is imported only when a mesh is
built, which keeps config validation cheap.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmhpc.config.schema import Config, ModelConfig, ParallelConfig, TrainerConfig
from llmhpc.config.validate import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

AC_MODES = ("none", "selective", "full")
ENGINES = ("torch", "deepspeed")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv")
DEFAULT_STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zbv": 2}
"""Pipeline stages each rank holds when parallel.pp_stages_per_rank is not set."""
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
"""Mesh dimension order, outermost first: pipeline stages talk least, tensor parallel most."""


class LayoutError(ConfigError):
    """A parallel layout that cannot run; the message names the rule and a valid layout."""


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun / srun set it; 1 when launched as a plain process."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise LayoutError(f"WORLD_SIZE={value!r} is not an integer") from None
    if size < 1:
        raise LayoutError(f"WORLD_SIZE must be >= 1, got {size}")
    return size


def stages_per_rank(p: ParallelConfig) -> int:
    """Local pipeline stages per rank: the explicit setting, else the schedule's default."""
    return p.pp_stages_per_rank or DEFAULT_STAGES_PER_RANK[p.pp_schedule]


_TP_SHARDED_SIZES = ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
"""Model sizes that tensor parallel splits across ranks: heads of the attention, the MLP's inner size, the
vocabulary (embedding rows and head columns). `dim` is never split (sequence parallel shards the sequence)."""


def valid_tp_sizes(model_cfg: ModelConfig) -> list[int]:
    """Every tp that divides all of the sharded sizes (the divisors of their gcd)."""
    common = math.gcd(*(getattr(model_cfg, key) for key in _TP_SHARDED_SIZES))
    return [d for d in range(1, common + 1) if common % d == 0]


def validate_tp(model_cfg: ModelConfig, tp: int) -> None:
    """Raise a one-line ValueError when `tp` cannot split this model evenly.

    Uneven shards would make column-wise heads straddle ranks (wrong attention) and DTensor shapes
    disagree across ranks, so we refuse up front and name the sizes that would work.
    """
    if tp < 1:
        raise ValueError(f"tp={tp} must be >= 1; valid tp for this model: {_fmt(valid_tp_sizes(model_cfg))}")
    for key in _TP_SHARDED_SIZES:
        size = getattr(model_cfg, key)
        if size % tp:
            raise ValueError(
                f"tp={tp} does not divide model.{key}={size}; "
                f"valid tp for this model: {_fmt(valid_tp_sizes(model_cfg))}"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel dimension; their product is the world size."""

    dp_replicate: int
    """Replicated data-parallel degree (DDP, or the outer dimension of HSDP)."""
    dp_shard: int
    """Sharded data-parallel degree (FSDP2, or the inner dimension of HSDP)."""
    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline stages."""
    world_size: int
    """Number of processes."""

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads a different slice of every global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        """Parameters are sharded with FSDP2 (alone, or inside HSDP)."""
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        """Parameters are replicated with DDP and nothing is sharded."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def hsdp(self) -> bool:
        """Sharded inside each replica group, replicated across groups."""
        return self.dp_replicate > 1 and self.dp_shard > 1

    def mesh_shape(self) -> list[tuple[str, int]]:
        """(name, size) of every dimension larger than 1, outermost first."""
        sizes = {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}
        return [(name, sizes[name]) for name in MESH_DIMS if sizes[name] > 1]

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """A named DeviceMesh over all ranks (None for one process), plus a flattened 'dp' dimension.

        'dp' spans dp_replicate x dp_shard and is what data loading and loss reduction use, whatever
        mix of replication and sharding the weights get.
        """
        shape = self.mesh_shape()
        if not shape:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        names = tuple(name for name, _ in shape)
        mesh = init_device_mesh(device_type, tuple(size for _, size in shape), mesh_dim_names=names)
        dp_names = tuple(name for name in names if name in ("dp_replicate", "dp_shard"))
        if len(dp_names) > 1:
            mesh[dp_names]._flatten("dp")
        return mesh


def _suggest(world: int, others: int) -> str:
    if world % others == 0:
        return f"e.g. parallel.dp_shard={world // others} (or -1 to fill)"
    return "e.g. parallel.dp_replicate=1 parallel.tp=1 parallel.pp=1 parallel.dp_shard=-1"


def resolve_dims(p: ParallelConfig, world_size: int) -> ParallelDims:
    """Fill dp_shard=-1 and check the degrees multiply to the world size."""
    for name in ("dp_replicate", "tp", "pp"):
        value = getattr(p, name)
        if value < 1:
            raise LayoutError(f"parallel.{name} must be >= 1, got {value}")
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise LayoutError(f"parallel.dp_shard must be >= 1 or -1 (fill the world size), got {p.dp_shard}")
    others = p.dp_replicate * p.tp * p.pp
    if p.dp_shard == -1:
        if world_size % others:
            raise LayoutError(
                f"parallel.dp_replicate*tp*pp = {others} does not divide the world size {world_size}; "
                f"use a product that divides {world_size}, e.g. parallel.dp_replicate=1 parallel.tp=1 parallel.pp=1"
            )
        dp_shard = world_size // others
    else:
        dp_shard = p.dp_shard
    product = others * dp_shard
    if product != world_size:
        raise LayoutError(
            f"parallel.dp_replicate*dp_shard*tp*pp = {p.dp_replicate}*{dp_shard}*{p.tp}*{p.pp} = {product} "
            f"but the world size is {world_size} (WORLD_SIZE / torchrun --nproc-per-node); "
            f"{_suggest(world_size, others)}"
        )
    return ParallelDims(p.dp_replicate, dp_shard, p.tp, p.pp, world_size)


def validate_layout(
    p: ParallelConfig, world_size: int, model: ModelConfig, trainer: TrainerConfig
) -> ParallelDims:
    """The run's ParallelDims, or a `LayoutError` naming the first rule the layout breaks."""
    if p.ac not in AC_MODES:
        raise LayoutError(f"parallel.ac={p.ac!r} is not one of: {', '.join(AC_MODES)}")
    if p.engine not in ENGINES:
        raise LayoutError(f"parallel.engine={p.engine!r} is not one of: {', '.join(ENGINES)}")
    if p.engine == "deepspeed":
        _validate_deepspeed(p)
    if p.pp_schedule not in PP_SCHEDULES:
        raise LayoutError(f"parallel.pp_schedule={p.pp_schedule!r} is not one of: {', '.join(PP_SCHEDULES)}")
    if p.tp > 1:
        try:
            validate_tp(model, p.tp)
        except ValueError as err:
            raise LayoutError(f"parallel.{err}") from None
        if trainer.seq_len % p.tp:
            raise LayoutError(
                f"trainer.seq_len={trainer.seq_len} is not a multiple of parallel.tp={p.tp}, which sequence "
                f"parallel needs (it splits every sequence across the tp ranks); e.g. trainer.seq_len="
                f"{max(1, trainer.seq_len // p.tp) * p.tp}"
            )
    if p.loss_parallel and (p.tp == 1 or p.pp > 1):
        raise LayoutError(
            f"parallel.loss_parallel=true needs parallel.tp > 1 and parallel.pp=1 (got tp={p.tp}, pp={p.pp}); "
            "set parallel.loss_parallel=false"
        )
    if p.pp > 1:
        _validate_pipeline(p, world_size, model)
    else:
        for name in ("pp_stages_per_rank", "pp_split_points"):
            if getattr(p, name):
                raise LayoutError(
                    f"parallel.{name}={getattr(p, name)} only applies to pipeline parallelism but parallel.pp=1; "
                    f"set parallel.pp > 1 or drop parallel.{name}"
                )
    dims = resolve_dims(p, world_size)
    micro = micro_batch_size(trainer, p, dims)
    per_step = micro * dims.dp_size
    if trainer.global_batch_size % per_step:
        fix = max(1, round(trainer.global_batch_size / per_step)) * per_step
        raise LayoutError(
            f"trainer.global_batch_size={trainer.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size*dp = {micro}*{dims.dp_size} = {per_step}; "
            f"e.g. trainer.global_batch_size={fix}"
        )
    if dims.pp > 1 and dims.dp_replicate > 1:
        raise LayoutError(
            f"parallel.dp_replicate={dims.dp_replicate} with parallel.pp={dims.pp} is not supported (DDP's reducer "
            f"expects one backward per forward, a pipeline runs several forwards first: measured 3e-3 off the "
            f"single-process loss); shard instead, e.g. parallel.dp_replicate=1 parallel.dp_shard={dims.dp_size}"
        )
    if dims.pp > 1:
        _validate_pipeline_batches(p, trainer.global_batch_size // per_step, per_step)
    if p.cpu_offload and not dims.fsdp:
        raise LayoutError(
            "parallel.cpu_offload=true needs FSDP (parallel.dp_shard > 1); set parallel.cpu_offload=false"
        )
    if dims.tp > 1 and dims.dp_replicate > 1:
        raise LayoutError(
            f"parallel.dp_replicate={dims.dp_replicate} with parallel.tp={dims.tp} is not yet supported (DDP and HSDP "
            f"are not verified with tensor parallel); shard instead, e.g. parallel.dp_replicate=1 "
            f"parallel.dp_shard={dims.dp_size}"
        )
    return dims


def micro_batch_size(trainer: TrainerConfig, p: ParallelConfig, dims: ParallelDims) -> int:
    """trainer.micro_batch_size, or when it is not set the largest one the layout can use.

    Without pipeline parallelism that is the whole per-rank share of the global batch (one micro-batch per
    step, no accumulation); with it, the largest size that still gives the schedule a multiple of `pp`
    micro-batches per step (every stage busy; interleaved and ZBV schedules need the multiple).
    """
    if trainer.micro_batch_size is not None:
        return trainer.micro_batch_size
    per_rank, remainder = divmod(trainer.global_batch_size, dims.dp_size)
    if remainder or per_rank == 0:
        raise LayoutError(
            f"trainer.global_batch_size={trainer.global_batch_size} cannot be split evenly over {dims.dp_size} "
            f"data-parallel ranks; e.g. trainer.global_batch_size="
            f"{max(1, round(trainer.global_batch_size / dims.dp_size)) * dims.dp_size}"
        )
    if dims.pp == 1:
        return per_rank
    fits = [m for m in range(per_rank, 0, -1) if per_rank % m == 0 and (per_rank // m) % p.pp == 0]
    if not fits:
        raise LayoutError(
            f"trainer.global_batch_size={trainer.global_batch_size} over dp={dims.dp_size} gives {per_rank} "
            f"sequences per rank, fewer than parallel.pp={p.pp} micro-batches; e.g. trainer.global_batch_size="
            f"{dims.dp_size * p.pp}"
        )
    return fits[0]


def resolve_layout(cfg: Config, world_size: int) -> tuple[Config, ParallelDims]:
    """Check cfg's layout on `world_size` processes; returns cfg with trainer.micro_batch_size filled in."""
    dims = validate_layout(cfg.parallel, world_size, cfg.model, cfg.trainer)
    micro = micro_batch_size(cfg.trainer, cfg.parallel, dims)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, micro_batch_size=micro)), dims


def _validate_deepspeed(p: ParallelConfig) -> None:
    """DeepSpeed ZeRO runs pure data parallelism over every rank, without our other wrappers."""
    if p.zero_stage not in (1, 2, 3):
        raise LayoutError(f"parallel.zero_stage={p.zero_stage} is not a ZeRO stage; use 1, 2 or 3")
    others = {"dp_replicate": p.dp_replicate, "tp": p.tp, "pp": p.pp}
    for name, value in others.items():
        if value != 1:
            raise LayoutError(
                f"parallel.engine=deepspeed shards over all ranks and does not combine with parallel.{name}={value}; "
                f"set parallel.{name}=1 (or parallel.engine=torch for FSDP2 with TP/PP)"
            )
    for name, default in (("ac", "none"), ("compile", False), ("cpu_offload", False)):
        if getattr(p, name) != default:
            raise LayoutError(
                f"parallel.{name}={getattr(p, name)} is not supported with parallel.engine=deepspeed yet; set "
                f"parallel.{name}={str(default).lower()} or use parallel.engine=torch"
            )


def _validate_pipeline(p: ParallelConfig, world_size: int, model: ModelConfig) -> None:
    """Rules of the stage split: schedule vs stages per rank, layers per stage."""
    if p.pp_stages_per_rank is not None and p.pp_stages_per_rank < 1:
        raise LayoutError(f"parallel.pp_stages_per_rank must be >= 1, got {p.pp_stages_per_rank}")
    per_rank = stages_per_rank(p)
    single = p.pp_schedule in ("gpipe", "1f1b")
    if (single and per_rank != 1) or (p.pp_schedule == "zbv" and per_rank != 2) or (
        p.pp_schedule == "interleaved_1f1b" and per_rank < 2
    ):
        need = {"gpipe": "1", "1f1b": "1", "zbv": "exactly 2", "interleaved_1f1b": ">= 2"}[p.pp_schedule]
        raise LayoutError(
            f"parallel.pp_schedule={p.pp_schedule} needs {need} stage(s) per rank, got parallel.pp_stages_per_rank="
            f"{per_rank}; leave it unset (default {DEFAULT_STAGES_PER_RANK[p.pp_schedule]}) or pick another schedule"
        )
    n_stages = p.pp * per_rank
    points = list(p.pp_split_points)
    if points:
        increasing = points == sorted(set(points)) and 0 < points[0] and points[-1] < model.n_layers
        if len(points) != n_stages - 1 or not increasing:
            raise LayoutError(
                f"parallel.pp_split_points={points} must be {n_stages - 1} increasing block indices in 1.."
                f"{model.n_layers - 1} (pp={p.pp} x {per_rank} stage(s) per rank = {n_stages} stages); "
                f"e.g. {[i * model.n_layers // n_stages for i in range(1, n_stages)]}"
            )
    elif model.n_layers % n_stages:
        valid = [s for s in _divisors(model.n_layers) if s % per_rank == 0 and world_size % (s // per_rank) == 0]
        raise LayoutError(
            f"parallel.pp={p.pp} x {per_rank} stage(s) per rank = {n_stages} stages do not divide model.n_layers="
            f"{model.n_layers}; valid pp for this model: {_fmt([s // per_rank for s in valid])}, or set "
            f"parallel.pp_split_points"
        )
    if p.compile and p.pp_schedule == "zbv":
        raise LayoutError(
            "parallel.compile=true does not work with parallel.pp_schedule=zbv (its split backward cannot run "
            "compiled blocks); set parallel.compile=false or use another schedule"
        )


def _validate_pipeline_batches(p: ParallelConfig, micro_batches: int, per_step: int) -> None:
    """Micro-batches per step must keep every stage busy and fit the schedule."""
    if micro_batches < p.pp:
        raise LayoutError(
            f"{micro_batches} micro-batches per step are fewer than parallel.pp={p.pp} stages (the pipeline "
            f"would idle); e.g. trainer.global_batch_size={p.pp * per_step}"
        )
    if p.pp_schedule in ("interleaved_1f1b", "zbv") and micro_batches % p.pp:
        fix = -(-micro_batches // p.pp) * p.pp * per_step
        raise LayoutError(
            f"parallel.pp_schedule={p.pp_schedule} needs micro-batches per step ({micro_batches}) to be a multiple "
            f"of parallel.pp={p.pp}; e.g. trainer.global_batch_size={fix}"
        )
