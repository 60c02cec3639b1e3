"""`llmhpc submit STAGE [key=value ...] [cluster.key=value ...] [--dry-run]`: run a stage as a Slurm job.

    llmhpc submit pretrain model=llama3_8b parallel.tp=8 parallel.dp_shard=8 cluster=h100_8x8 \
        cluster.partition=gpu cluster.account=myproj cluster.time=2-00:00:00 run.dir=runs/llama8b
    llmhpc submit sft model.init_from=runs/llama8b run.dir=runs/sft cluster.nodes=1 --dry-run

The stage's config is composed and checked here first, as the job will compose it (same defaults, same
overrides), and its layout is checked against the job's world size (nodes x workers per node); on GPUs the
planner's memory estimate must fit, or nothing is submitted. The script is `slurm/stage.sbatch`'s body under
#SBATCH lines rendered from `cluster.*`, with the stage and its overrides baked in. It is written with the resolved
config to `<run.dir>/slurm/`, where the job's log goes too; then `sbatch` is called and the job id and log path
printed. `--dry-run` prints the script and submits nothing.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from llmhpc.config import ConfigError
from llmhpc.config.schema import ClusterConfig, Config
from llmhpc.errors import InputError

TEMPLATE = Path(__file__).resolve().parents[1] / "conf" / "slurm" / "stage.sbatch"
"""The sbatch template (`slurm/stage.sbatch` in the source tree links to it)."""

DRY_RUN = "--dry-run"


def split_args(args: list[str]) -> tuple[str, list[str], list[str], bool]:
    """(stage, its overrides, cluster overrides, dry run) of `llmhpc submit`'s words."""
    from llmhpc.stages.registry import STAGES

    words = [a for a in args if a != DRY_RUN]
    if not words or "=" in words[0]:
        raise ConfigError("name the stage to submit first: llmhpc submit STAGE [key=value ...], e.g. "
                          "llmhpc submit pretrain run.dir=runs/x")
    stage = words[0]
    if stage not in STAGES or STAGES[stage].raw or not STAGES[stage].check_layout:
        runnable = [n for n, s in STAGES.items() if s.check_layout and not s.raw and " " not in n]
        raise ConfigError(f"'{stage}' is not a stage a Slurm job runs; choose one of {', '.join(runnable)}")
    cluster = [w for w in words[1:] if w.split("=", 1)[0].lstrip("+~").split(".", 1)[0] == "cluster"]
    rest = [w for w in words[1:] if w not in cluster]
    return stage, rest, cluster, DRY_RUN in args


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


def render(stage: str, overrides: list[str], cluster: ClusterConfig, log_dir: Path) -> str:
    """The job script: #SBATCH lines from `cluster`, the stage and overrides, then the template's body."""
    body = TEMPLATE.read_text(encoding="utf-8")
    body = body[body.index("set -euo pipefail"):]
    log = f"{log_dir}/%j.out"
    options = [f"--job-name=llmhpc-{stage}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1",
               f"--time={cluster.time}", f'--output="{log}"' if any(c.isspace() for c in log) else f"--output={log}"]
    if cluster.gpus_per_node:
        options += [f"--gpus-per-node={cluster.gpus_per_node}", "--exclusive"]
    options += [f"--{key}={value}" for key in ("partition", "account", "qos") if (value := getattr(cluster, key))]
    lines = ["#!/bin/bash", f"# Written by `llmhpc submit {stage}`; the resolved config is {log_dir}/config.yaml."]
    lines += [f"#SBATCH {option}" for option in options]
    lines += [f"export LLMHPC_PROCS_PER_NODE={workers_per_node(cluster)}",
              f"export LLMHPC_PYTHON=${{LLMHPC_PYTHON:-{shlex.quote(sys.executable)}}}",
              f"set -- {shlex.join([stage, *overrides])}"]
    return "\n".join(lines) + "\n" + body


def submit(args: list[str]) -> tuple[str, Path | None]:
    """Check, render, write and (unless --dry-run) submit; returns (script text or job id, log path)."""
    from llmhpc.config.load import load_config, to_yaml
    from llmhpc.stages.registry import load_stage_config

    stage, overrides, cluster_overrides, dry_run = split_args(args)
    cfg = load_stage_config(stage, overrides, check_layout=False)
    cluster = load_config("plan", cluster_overrides, sections=("cluster",), check_layout=False).cluster
    cfg = check_plan(cfg, cluster, cluster.nodes * workers_per_node(cluster))
    log_dir = Path(cfg.run.dir).expanduser().resolve() / "slurm"
    script = render(stage, overrides, cluster, log_dir)
    if dry_run:
        return script, None
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise InputError("sbatch not found: llmhpc submit needs a Slurm client on this machine (to try Slurm "
                         "locally: sudo bash tools/slurm_local.sh)")
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{stage}.sbatch"
    path.write_text(script, encoding="utf-8")
    (log_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise InputError(f"sbatch refused {path}: {reason}")
    job = proc.stdout.strip().split(";")[0]
    return job, log_dir / f"{job}.out"


def main(cfg: Config | None, args: list[str]) -> int:
    """`llmhpc submit`: print the script (--dry-run) or the submitted job's id and log."""
    text, log = submit(args)
    if log is None:
        print(text, end="")
    else:
        print(f"submitted job {text}: log {log}")
    return 0
