"""What every Slurm submission checks before anything reaches sbatch: the job's workers, the layout and memory plan
on the job's world size, and that there is an sbatch to call. Shared by one job, a chain (`llmhpc.stages.submit`)
and a sweep (`llmhpc.stages.sweep`)."""

from __future__ import annotations

import shutil

from llmhpc.config import ConfigError
from llmhpc.config.schema import ClusterConfig, Config
from llmhpc.errors import InputError


def workers_per_node(cluster: ClusterConfig) -> int:
    """Processes each node starts: `workers_per_node`, else one per GPU."""
    workers = cluster.workers_per_node or cluster.gpus_per_node
    if workers < 1:
        raise ConfigError("cluster.gpus_per_node=0 needs cluster.workers_per_node=N (processes per CPU node)")
    return workers


def check_plan(cfg: Config, cluster: ClusterConfig, world: int) -> Config:
    """The layout on the job's world size, and on GPUs the planner's memory estimate; ConfigError in one line.
    Returns cfg resolved for that world size (trainer.micro_batch_size filled in), as the job will resolve it."""
    from llmhpc.config.layout import resolve_layout

    cfg, _ = resolve_layout(cfg, world)
    if cluster.gpus_per_node == 0:
        return cfg
    from llmhpc.plan.cluster import Cluster
    from llmhpc.plan.efficiency import stack
    from llmhpc.plan.layout import Layout
    from llmhpc.plan.search import evaluate

    planned = Cluster.of(cluster)
    candidate = evaluate(cfg, Layout.of(cfg, planned.world_size), planned, stack(cfg.plan.stack))
    if not candidate.fits:
        need, have = candidate.memory.total / 2**30, planned.gpu.hbm_bytes / 2**30
        raise ConfigError(f"the planner estimates {need:.1f} GiB per GPU for this layout, more than "
                          f"{cfg.plan.memory_margin:.0%} of the {cluster.gpu}'s {have:.0f} GiB: not submitted; "
                          f"see `llmhpc plan` with the same overrides for a layout that fits")
    return cfg


def require_sbatch() -> str:
    """The path of sbatch; InputError in one line when this machine has no Slurm client."""
    command = shutil.which("sbatch")
    if command is None:
        raise InputError("sbatch not found: llmhpc submit needs a Slurm client on this machine (to try Slurm "
                         "locally: sudo bash tools/slurm_local.sh)")
    return command
