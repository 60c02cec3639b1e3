"""`llmhpc submit STAGE [key=value ...] [cluster.key=value ...] [--dry-run | --multirun]`: run a stage as a Slurm job;
`llmhpc submit chain STAGE [key=value ...] STAGE [key=value ...] ...`: a chain of them.

    llmhpc submit pretrain model=llama3_8b parallel.tp=8 parallel.dp_shard=8 cluster=h100_8x8 \
        cluster.partition=gpu cluster.account=myproj cluster.time=2-00:00:00 run.dir=runs/llama8b
    llmhpc submit sft model.init_from=runs/llama8b run.dir=runs/sft cluster.nodes=1 --dry-run
    llmhpc submit chain pretrain run.dir=runs/pt cluster.nodes=8 sft run.dir=runs/sft grpo run.dir=runs/grpo
    llmhpc submit pretrain trainer.lr=1e-4,3e-4 run.dir=runs/lr --multirun

The stage's config is composed and checked here first, as the job will compose it (same defaults, same
overrides), and its layout is checked against the job's world size (nodes x workers per node); on GPUs the
planner's memory estimate must fit, or nothing is submitted. The script is `slurm/stage.sbatch`'s body under
#SBATCH lines rendered from `cluster.*`, with the stage and its overrides baked in. It is written with the resolved
config to `<run.dir>/slurm/`, where the job's log goes too; then `sbatch` is called and the job id and log path
printed. `--dry-run` prints the script and submits nothing.

The job is requeueable: `cluster.signal_lead_s` seconds before its time limit Slurm sends it USR1, every rank
finishes its step and checkpoints, and the job requeues itself (at most `cluster.max_requeues` times) and resumes
from that checkpoint with the same W&B run; see docs/slurm.md.

A chain checks every stage first, then submits them in order, each with `--dependency=afterok:<previous job>`
(and `--kill-on-invalid-dep=yes`: when a stage fails, the ones after it are cancelled, never started). Each stage
after the first starts from the one before it: `model.init_from=<its run.dir>` unless given; each stage needs its
own run.dir, and `cluster.*` words apply to the stage they follow. `--multirun` sends a Hydra sweep
(`key=a,b`) as one Slurm array job (llmhpc.stages.sweep).
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

from llmhpc.config import ConfigError
from llmhpc.config.schema import ClusterConfig, Config
from llmhpc.errors import InputError
from llmhpc.stages.job_checks import check_plan, require_sbatch, workers_per_node

TEMPLATE = Path(__file__).resolve().parents[1] / "conf" / "slurm" / "stage.sbatch"
"""The sbatch template (`slurm/stage.sbatch` in the source tree links to it)."""

DRY_RUN = "--dry-run"
MULTIRUN = "--multirun"
CHAIN = "chain"
ONE_PROCESS_JOBS = ("convert",)
"""Stages a job runs as one process on one node (no layout, no planner); their log goes beside their output."""


def split_args(args: list[str]) -> tuple[str, list[str], list[str], bool]:
    """(stage, its overrides, cluster overrides, dry run) of `llmhpc submit`'s words."""
    from llmhpc.stages.registry import STAGES

    words = [a for a in args if a not in (DRY_RUN, MULTIRUN)]
    if not words or "=" in words[0]:
        raise ConfigError("name the stage to submit first: llmhpc submit STAGE [key=value ...], e.g. "
                          "llmhpc submit pretrain run.dir=runs/x")
    runnable = [n for n, s in STAGES.items() if (s.check_layout or n in ONE_PROCESS_JOBS) and not s.raw
                and " " not in n]
    stage = words[0]
    if stage not in runnable:
        raise ConfigError(f"'{stage}' is not a stage a Slurm job runs; choose one of {', '.join(runnable)}")
    cluster = [w for w in words[1:] if w.split("=", 1)[0].lstrip("+~").split(".", 1)[0] == "cluster"]
    rest = [w for w in words[1:] if w not in cluster]
    return stage, rest, cluster, DRY_RUN in args


def render(stage: str, overrides: list[str], cluster: ClusterConfig, log_dir: Path) -> str:
    """The job script: #SBATCH lines from `cluster`, the stage and overrides, then the template's body."""
    body = TEMPLATE.read_text(encoding="utf-8")
    body = body[body.index("set -euo pipefail"):]
    log = f"{log_dir}/%j.out"
    options = [f"--job-name=llmhpc-{stage}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1",
               f"--time={cluster.time}", f'--output="{log}"' if any(c.isspace() for c in log) else f"--output={log}",
               "--open-mode=append", "--requeue", f"--signal=B:USR1@{cluster.signal_lead_s}"]
    if cluster.gpus_per_node:
        options += [f"--gpus-per-node={cluster.gpus_per_node}", "--exclusive"]
    options += [f"--{key}={value}" for key in ("partition", "account", "qos") if (value := getattr(cluster, key))]
    lines = ["#!/bin/bash", f"# Written by `llmhpc submit {stage}`; the resolved config is {log_dir}/config.yaml."]
    lines += [f"#SBATCH {option}" for option in options]
    lines += [f"export LLMHPC_PROCS_PER_NODE={workers_per_node(cluster)}",
              f"export LLMHPC_PYTHON=${{LLMHPC_PYTHON:-{shlex.quote(sys.executable)}}}",
              f'export LLMHPC_STOP_FILE={shlex.quote(str(log_dir))}/stop-"$SLURM_JOB_ID"',
              f"export LLMHPC_MAX_REQUEUES={cluster.max_requeues}",
              f"echo 'llmhpc: resolved config:'; sed 's/^/    /' {shlex.quote(str(log_dir / 'config.yaml'))}",
              f"set -- {shlex.join([stage, *overrides])}"]
    return "\n".join(lines) + "\n" + body


@dataclasses.dataclass
class Job:
    """One stage, checked and rendered, ready for sbatch."""

    stage: str
    script: str
    log_dir: Path
    cfg: Config
    output: Path
    """What the stage writes: its run.dir, or a conversion's dst (what the next stage of a chain reads)."""


def prepare(args: list[str]) -> Job:
    """Compose and check the stage's config as the job will (layout on its world size, planner memory on GPUs),
    and render its script; nothing is written."""
    from llmhpc.config.load import load_config
    from llmhpc.stages.registry import load_stage_config

    stage, overrides, cluster_overrides, _ = split_args(args)
    cfg = load_stage_config(stage, overrides, check_layout=False)
    cluster = load_config("plan", cluster_overrides, sections=("cluster",), check_layout=False).cluster
    if stage in ONE_PROCESS_JOBS:
        if not cfg.convert.dst:
            raise ConfigError("dst is not set: name where the conversion writes (dst=...)")
        given = any(w.split("=", 1)[0] == "cluster.gpus_per_node" for w in cluster_overrides)
        gpus = cluster.gpus_per_node if given else int(cfg.convert.build_engine)  # only an engine build needs one
        cluster = dataclasses.replace(cluster, nodes=1, gpus_per_node=gpus, workers_per_node=1)
        output = Path(cfg.convert.dst).expanduser().resolve()
        log_dir = output.parent / f"{output.name}.slurm"
    else:
        cfg = check_plan(cfg, cluster, cluster.nodes * workers_per_node(cluster))
        output = Path(cfg.run.dir).expanduser().resolve()
        log_dir = output / "slurm"
    return Job(stage, render(stage, overrides, cluster, log_dir), log_dir, cfg, output)


def sbatch(job: Job, after: str | None = None) -> str:
    """Write the job's script and resolved config into run.dir/slurm and submit it (after job `after` succeeds,
    and cancelled if that one fails); returns the job id."""
    from llmhpc.config.load import to_yaml

    command = require_sbatch()
    job.log_dir.mkdir(parents=True, exist_ok=True)
    path = job.log_dir / f"{job.stage}.sbatch"
    path.write_text(job.script, encoding="utf-8")
    (job.log_dir / "config.yaml").write_text(to_yaml(job.cfg), encoding="utf-8")
    dependency = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    proc = subprocess.run([command, "--parsable", *dependency, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise InputError(f"sbatch refused {path}: {reason}")
    return proc.stdout.strip().split(";")[0]


def chain_segments(words: list[str]) -> list[list[str]]:
    """`STAGE [k=v ...] STAGE [k=v ...] ...` cut before each word that names a stage (no '=', no leading '-')."""
    segments: list[list[str]] = []
    for word in words:
        if "=" not in word and not word.startswith("-") or not segments:
            segments.append([])
        segments[-1].append(word)
    return segments


def prepare_chain(args: list[str]) -> list[Job]:
    """Every stage of `llmhpc submit chain ...` checked, each after the first starting from the one before it
    (model.init_from=<its run.dir>, unless given); all of them before anything is submitted."""
    segments = chain_segments([a for a in args if a != DRY_RUN])
    if len(segments) < 2:
        raise ConfigError("a chain needs two stages or more: llmhpc submit chain pretrain run.dir=runs/pt "
                          "sft run.dir=runs/sft [cluster.key=value ...]")
    jobs: list[Job] = []
    for words in segments:
        source = "src" if words[0] in ONE_PROCESS_JOBS else "model.init_from"
        if jobs and not any(w.lstrip("+").startswith(f"{source}=") for w in words):
            words = [*words, f"{source}={jobs[-1].output}"]
        job = prepare(words)
        clash = next((j for j in jobs if j.output == job.output), None)
        if clash:
            raise ConfigError(f"stages {clash.stage} and {job.stage} of the chain both write {job.output}: the second "
                              f"would resume (or overwrite) the first's; give each stage its own run.dir / dst")
        jobs.append(job)
    return jobs


def submit(args: list[str]) -> tuple[str, Path | None]:
    """Check, render, write and (unless --dry-run) submit; returns (script text or job id, log path)."""
    words = [a for a in args if not a.startswith("--")]
    if words and words[0] == CHAIN:
        return submit_chain([a for a in args if a != CHAIN])
    stage, overrides, cluster_overrides, dry_run = split_args(args)
    if MULTIRUN in args:
        from llmhpc.stages.sweep import submit_sweep

        return submit_sweep(stage, overrides, cluster_overrides, dry_run)
    job = prepare([a for a in args if a != DRY_RUN])
    if dry_run:
        return job.script, None
    job_id = sbatch(job)
    return job_id, job.log_dir / f"{job_id}.out"


def submit_chain(args: list[str]) -> tuple[str, Path | None]:
    """`llmhpc submit chain ...`: every stage checked first, then submitted in order, each `afterok` the one
    before; returns ('<id> -> <id> ...' or the scripts, the last stage's log)."""
    jobs = prepare_chain(args)
    if DRY_RUN in args:
        return "\n".join(f"# ---- stage {i + 1} of {len(jobs)}: {job.stage} ----\n{job.script}"
                         for i, job in enumerate(jobs)), None
    ids: list[str] = []
    try:
        for job in jobs:
            ids.append(sbatch(job, after=ids[-1] if ids else None))
    except InputError as exc:  # no half chains: what was submitted goes too
        if not ids:
            raise
        subprocess.run(["scancel", *ids], capture_output=True)
        raise InputError(f"{exc}; cancelled the stages already submitted (jobs {' '.join(ids)})") from None
    return " -> ".join(ids), jobs[-1].log_dir / f"{ids[-1]}.out"


def main(cfg: Config | None, args: list[str]) -> int:
    """`llmhpc submit`: print the script (--dry-run) or the submitted job's id and log."""
    text, log = submit(args)
    if log is None:
        print(text, end="")
    else:
        print(f"submitted job{'s' if ' -> ' in text else ''} {text}: log {log}")
    return 0
