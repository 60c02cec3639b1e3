"""Enumerate the layouts llmhpc accepts on a cluster, keep those that fit, rank them by speed."""

from __future__ import annotations

from dataclasses import dataclass

from llmhpc.config.schema import Config
from llmhpc.config.validate import ConfigError
from llmhpc.plan.cluster import Cluster
from llmhpc.plan.efficiency import Stack
from llmhpc.plan.layout import RECOMPUTE_FRACTION, Layout, with_layout
from llmhpc.plan.memory import MemoryBreakdown, estimate_memory
from llmhpc.plan.throughput import StepEstimate, estimate_step
from llmhpc.plan.workload import Workload

MICRO_BATCHES = (1, 2, 4, 8)
"""Micro-batch sizes tried per data-parallel rank."""
SCHEDULES = {"1f1b": 1, "interleaved_1f1b": 2, "zbv": 2, "gpipe": 1}
"""Pipeline schedules tried, with their stages per rank."""
SEARCHED_KEYS = ("parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "parallel.pp", "parallel.pp_schedule",
                 "parallel.ac", "trainer.micro_batch_size", "parallel.pp_stages_per_rank", "parallel.engine",
                 "parallel.loss_parallel")
"""Keys the search varies unless the command line fixes them."""


@dataclass(frozen=True)
class Candidate:
    """A valid layout with its estimates."""

    layout: Layout
    """The layout."""
    memory: MemoryBreakdown
    """Its peak memory per GPU."""
    step: StepEstimate
    """Its step-time estimate."""
    fits: bool
    """Peak memory within plan.memory_margin of the GPU's."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(cfg: Config, cluster: Cluster, fixed: set[str]) -> list[Layout]:
    """Every combination of degrees, data-parallel flavour, schedule, micro-batch and AC, minus fixed keys."""
    p, world = cfg.parallel, cluster.world_size

    def options(key: str, values):
        return [values[0]] if key in fixed else values

    out = []
    tps = options("parallel.tp", [p.tp] if "parallel.tp" in fixed else [t for t in _divisors(world)
                                                                         if t <= cluster.gpus_per_node])
    for tp in tps:
        pps = [p.pp] if "parallel.pp" in fixed else [q for q in _divisors(world // tp) if q <= cfg.model.n_layers]
        for pp in pps:
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            splits = {(1, dp), (dp, 1)}
            per_node = max(1, cluster.gpus_per_node // tp)
            if dp % per_node == 0:
                splits.add((dp // per_node, per_node))
            if "parallel.dp_replicate" in fixed or "parallel.dp_shard" in fixed:
                shard = p.dp_shard if p.dp_shard != -1 else dp // p.dp_replicate
                splits = {(p.dp_replicate, shard)}
            schedules = {p.pp_schedule: p.pp_stages_per_rank or SCHEDULES.get(p.pp_schedule, 1)} if (
                "parallel.pp_schedule" in fixed) else (SCHEDULES if pp > 1 else {"1f1b": 1})
            acs = [p.ac] if "parallel.ac" in fixed else list(RECOMPUTE_FRACTION)
            mbs = [cfg.trainer.micro_batch_size] if "trainer.micro_batch_size" in fixed else list(MICRO_BATCHES)
            # Loss parallel only saves memory (same step time in the model), so it is on wherever it applies.
            loss_parallel = p.loss_parallel if "parallel.loss_parallel" in fixed else (tp > 1 and pp == 1)
            for rep, shard in sorted(splits):
                for schedule, v in schedules.items():
                    for ac in acs:
                        for mb in mbs:
                            out.append(Layout(rep, shard, tp, pp, schedule, v if pp > 1 else 1,
                                              RECOMPUTE_FRACTION[ac], mb, p.engine, p.zero_stage,
                                              p.reshard_after_forward, p.compile, loss_parallel))
    return out


def evaluate(cfg: Config, layout: Layout, cluster: Cluster, stack: Stack) -> Candidate:
    """Memory and time of one layout (not validated)."""
    w = Workload.of(cfg)
    memory = estimate_memory(w, layout)
    step = estimate_step(w, layout, cluster, stack)
    return Candidate(layout, memory, step, memory.total <= cfg.plan.memory_margin * cluster.gpu.hbm_bytes)


def search(cfg: Config, cluster: Cluster, stack: Stack, fixed: set[str]) -> list[Candidate]:
    """Valid layouts (by llmhpc's own `validate`), the ones that fit first, each group fastest first."""
    found = []
    for layout in _layouts(cfg, cluster, fixed):
        try:
            Layout.of(with_layout(cfg, layout), cluster.world_size)
        except ConfigError:
            continue
        found.append(evaluate(cfg, layout, cluster, stack))
    return sorted(found, key=lambda c: (not c.fits, -c.step.tokens_per_s_per_gpu))
