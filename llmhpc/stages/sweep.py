"""`llmhpc submit STAGE [key=a,b ...] [cluster.key=value ...] --multirun [--dry-run]`: a sweep as one Slurm array job.

    llmhpc submit pretrain trainer.lr=1e-3,3e-3 run.dir=runs/lr cluster.nodes=1 --multirun
    llmhpc submit pretrain trainer.lr=1e-3,3e-3 trainer.warmup_steps=range(0,200,100) run.dir=runs/lr \
        cluster.gpus_per_node=0 cluster.workers_per_node=2 --multirun --dry-run

The overrides are read with Hydra's own override grammar (`a,b`, `range(...)`, `choice(...)`, `glob(...)`, quoting)
and expanded as Hydra's BasicSweeper does: the cartesian product of the swept values, keys in the order they are
first given. Each point is one run with plain `key=value` overrides; its run directory is `<run.dir>/<index>` (Hydra's
multirun convention), unless run.dir itself is swept (or interpolates a swept key), where each point keeps its own.
Every point is composed and checked first, as `llmhpc submit` checks one job (its layout on the job's world size,
nodes x workers per node, and on GPUs the planner's memory estimate): one invalid point and nothing is submitted.

All points then go to Slurm as ONE array job (`llmhpc-<stage>-sweep`, one task per point) from `cluster.*`: nodes,
GPUs per node, partition, account, QoS and `cluster.time` as the tasks' time limit. Each task runs `PointRun` on each
of its nodes, which starts the point the way `slurm/stage.sbatch` starts a stage: one torchrun per node joining a c10d
rendezvous on the task's first host, on port LLMHPC_RDZV_PORT (default 29500) plus the task id, since tasks of one
array may share a node. Tasks requeue like `llmhpc submit`'s jobs: on the warning signal submitit asks Slurm for
(USR2, 90 s before the time limit, or a preemption) the point checkpoints its step and its task is requeued, then
resumes (see `PointRun`). The logs (`<array job>_<task>_0_log.out`, by submitit) and `sweep.json` (the points, their
overrides and run directories) go to `<run.dir>/slurm/`. `--dry-run` prints the points and the job's parameters and
submits nothing.

Why submitit directly and not Hydra's submitit launcher plugin: the launcher runs inside an `@hydra.main` application,
and our CLI composes configs with Hydra's compose API (`llmhpc.config.load`), so the plugin has no Hydra app to attach
to. The sweep grammar and its expansion are still Hydra's; submitit (the library under the plugin) writes and submits
the array job.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from llmhpc.config import ConfigError
from llmhpc.config.schema import ClusterConfig
from llmhpc.errors import InputError
from llmhpc.train.preemption import STOP_FILE_ENV

MAX_POINTS = 256
"""The most points one sweep may have (one array job; Slurm's MaxArraySize is often 1001, queues are smaller)."""

RUN_DIR = "run.dir"
OUTPUT_TAIL_LINES = 40
"""Lines of a failed point's output repeated in the error submitit records."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    index: int
    """Its position in the sweep (the array task id)."""
    overrides: tuple[str, ...]
    """Plain `key=value` overrides of the stage, run.dir included: what the task passes to `llmhpc <stage>`."""
    swept: tuple[str, ...]
    """The overrides of the swept keys only (for summaries)."""
    run_dir: Path
    """Where the point's run writes (absolute)."""


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """(one list of plain overrides per point, the swept keys) of `overrides` in Hydra's sweep grammar.

    The cartesian product in BasicSweeper's order: keys in the order first given (a key given twice keeps its first
    place and its last value), the last key varying fastest. Raises ConfigError on a parse error, a sweep that is
    not a list of values (interval(...), which only optimizing sweepers sample) or more than MAX_POINTS points.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from llmhpc.config.load import CONF_DIR

    values: dict[str, list[str]] = {}
    is_sweep: dict[str, bool] = {}
    try:  # glob(...) lists a group's presets: it needs a config loader on our config tree
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="llmhpc"):
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            for override in parser.parse_overrides(overrides):
                key = override.get_key_element()
                is_sweep[key] = override.is_sweep_override()
                if not is_sweep[key]:
                    values[key] = [f"{key}={override.get_value_element_as_str()}"]
                elif override.is_discrete_sweep():
                    values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
                else:
                    raise ConfigError(f"'{override.input_line}' is not a list of values to sweep; give the values "
                                      f"(a,b,c), range(start,stop,step) or choice(...)")
    except HydraException as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"{first} (Hydra's override grammar, sweeps included: "
                          f"https://hydra.cc/docs/advanced/override_grammar/extended)") from None
    count = math.prod(len(v) for v in values.values())
    if count > MAX_POINTS:
        raise ConfigError(f"this sweep has {count} points, more than {MAX_POINTS} (one array job): sweep fewer values "
                          f"or split it into several sweeps")
    points = [list(point) for point in itertools.product(*values.values())]
    return points, [_key(key) for key, swept in is_sweep.items() if swept]


def _with_run_dir(overrides: list[str], run_dir: Path) -> list[str]:
    """`overrides` with run.dir set to `run_dir` (in place of the given one, else appended)."""
    from hydra._internal.grammar.utils import escape_special_characters

    setting = f"{RUN_DIR}={escape_special_characters(str(run_dir))}"
    kept = [setting if _key(o) == RUN_DIR else o for o in overrides]
    return kept if setting in kept else [*kept, setting]


def sweep_points(stage: str, overrides: list[str]) -> tuple[list[Point], Path]:
    """The sweep's points and its own directory (`<run.dir>`, where `slurm/` goes); ConfigError in one line."""
    from llmhpc.stages.registry import load_stage_config

    expanded, swept = expand(overrides)
    if not swept or len(expanded) < 2:
        raise ConfigError("--multirun needs a swept key with two or more values, e.g. trainer.lr=1e-3,3e-3 (or "
                          "range(...), choice(...)); for one run drop --multirun")
    given_dir = next((o.split("=", 1)[1] for o in reversed(overrides) if _key(o) == RUN_DIR), "")
    own_dirs = RUN_DIR in swept or "${" in given_dir
    if own_dirs:
        dirs = [Path(load_stage_config(stage, p, check_layout=False).run.dir).expanduser().resolve() for p in expanded]
        for (i, a), (j, b) in itertools.combinations(enumerate(dirs), 2):
            if a == b:
                raise ConfigError(f"sweep points {i} and {j} both write to run.dir={a}: give each point its own "
                                  f"run.dir, or one run.dir for the sweep (points then go to <run.dir>/<index>)")
        root = Path(os.path.commonpath(dirs))
    else:
        root = Path(load_stage_config(stage, expanded[0], check_layout=False).run.dir).expanduser().resolve()
        dirs = [root / str(i) for i in range(len(expanded))]
    points = []
    for i, (point, run_dir) in enumerate(zip(expanded, dirs, strict=True)):
        point = point if own_dirs else _with_run_dir(point, run_dir)
        points.append(Point(i, tuple(point), tuple(o for o in point if _key(o) in swept), run_dir))
    return points, root


def check_points(stage: str, points: list[Point], cluster: ClusterConfig) -> None:
    """Compose and check every point as its job will (layout on the job's world size, memory on GPUs)."""
    from llmhpc.stages.job_checks import check_plan, workers_per_node
    from llmhpc.stages.registry import load_stage_config

    world = cluster.nodes * workers_per_node(cluster)
    for point in points:
        try:
            check_plan(load_stage_config(stage, list(point.overrides), check_layout=False), cluster, world)
        except ConfigError as exc:
            raise ConfigError(f"sweep point {point.index} ({' '.join(point.swept)}): {exc}; nothing submitted") \
                from None


_SLURM_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<rest>\d+(?::\d+){0,2})")


def timeout_minutes(time: str) -> int:
    """Minutes of a Slurm time limit ('MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS'), seconds rounded
    up; ConfigError for anything else (0 too, which Slurm reads as no limit)."""
    match = _SLURM_TIME.fullmatch(time.strip())
    if match is None:
        raise ConfigError(f"cluster.time='{time}' is not a Slurm time limit; write e.g. cluster.time=04:00:00 or "
                          f"cluster.time=2-00:00:00")
    parts = [int(p) for p in match["rest"].split(":")]
    if match["days"] is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # HH:MM:SS
        hours, minutes, seconds = parts
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, parts[0], (parts[1] if len(parts) == 2 else 0)
    total = int(match["days"] or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"cluster.time='{time}' gives the sweep's tasks no time; write e.g. cluster.time=04:00:00")
    return -(-total // 60)


def executor_parameters(stage: str, cluster: ClusterConfig) -> dict[str, Any]:
    """`submitit.AutoExecutor.update_parameters` keywords of the sweep's array job, from `cluster`."""
    params: dict[str, Any] = {"name": f"llmhpc-{stage}-sweep", "nodes": cluster.nodes, "tasks_per_node": 1,
                              "timeout_min": timeout_minutes(cluster.time), "stderr_to_stdout": True,
                              "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    if cluster.gpus_per_node > 0:
        params.update(gpus_per_node=cluster.gpus_per_node, slurm_exclusive=True)
    for key in ("partition", "account", "qos"):
        if value := getattr(cluster, key):
            params[f"slurm_{key}"] = value
    return params


def describe(stage: str, points: list[Point], root: Path, params: dict[str, Any], workers: int) -> str:
    """What a sweep submits, for --dry-run: the job's parameters, the overrides common to all points, each point."""
    import shlex

    common = [o for o in points[0].overrides if o not in points[0].swept and _key(o) != RUN_DIR]
    lines = [f"sweep of llmhpc {stage}: {len(points)} points as one Slurm array job (tasks 0-{len(points) - 1}), "
             f"logs in {root / 'slurm'}",
             "job: " + " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in params.items()),
             f"each task: one torchrun per node, {workers} worker(s) per node, rendezvous on the first host, port "
             f"LLMHPC_RDZV_PORT (default 29500) + task id",
             f"common overrides: {shlex.join(common) if common else '(none)'}",
             "points (index, run.dir, swept overrides):"]
    lines += [f"  {p.index:>3}  {p.run_dir}  {shlex.join(p.swept)}" for p in points]
    return "\n".join(lines) + "\n"


def _head_node() -> str:
    """The job's first host, as `slurm/stage.sbatch` picks it (`scontrol show hostnames $SLURM_JOB_NODELIST`);
    localhost outside a Slurm job."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "localhost"
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    import socket

    try:  # without scontrol: submitit's own reading of the node list, inside its job
        return submitit.JobEnvironment().hostnames[0]
    except RuntimeError:
        return socket.gethostname()


def _ignore_warning_signal() -> None:
    """In torchrun's process, before exec: ignore submitit's warning signal, which Slurm sends to every process of
    the task. torchrun and its workers inherit the ignored signal (it would end them); `PointRun.checkpoint` asks
    the run to stop through the stop file instead."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class PointRun(submitit.helpers.Checkpointable):
    """One array task on one node: torchrun `llmhpc <stage> <overrides>` as `slurm/stage.sbatch` does.

    Requeueable like a job of `llmhpc submit`: on the warning Slurm sends before the time limit or a preemption
    (submitit's USR2), submitit calls `checkpoint`, which creates the stop file, waits until every rank has
    finished its step and checkpointed, and returns a fresh runner with the same arguments for submitit to requeue;
    the requeued task resumes from that checkpoint. A run that did not checkpoint a new step is not requeued."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None  # the runner is pickled for submitit: no locks before the call
        self._ended: threading.Event | None = None

    def __call__(self, stage: str, overrides: list[str], workers: int, port_base: int, cwd: str,
                 stop_file: str = "") -> str:
        """Run the point; returns its overrides as one line, or raises RuntimeError with the tail of its output if
        it fails (submitit then records the task as failed)."""
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "local")
        task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
        nodes = os.environ.get("SLURM_JOB_NUM_NODES", "1")
        head, port = _head_node(), port_base + task
        env = dict(os.environ, TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK") or "8"
        if stop_file:
            Path(stop_file).unlink(missing_ok=True)  # left by the attempt before a requeue
            env[STOP_FILE_ENV] = stop_file
        python = os.environ.get("LLMHPC_PYTHON") or sys.executable
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        command = [python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={workers}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{port}", f"--rdzv-id={job}_{task}-{restarts}",
                   f"--rdzv-conf=join_timeout={os.environ.get('LLMHPC_RDZV_TIMEOUT', '900')}",
                   "-m", "llmhpc", stage, *overrides]
        print(f"llmhpc: job {job}_{task} stage {stage}: {nodes} node(s) x {workers} worker(s), rendezvous "
              f"{head}:{port}, attempt {int(restarts) + 1}", flush=True)
        print(f"llmhpc: overrides {' '.join(overrides)}", flush=True)
        tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._ended = threading.Event()
        self._proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, errors="replace", preexec_fn=_ignore_warning_signal)
        # The output is relayed by a thread, so that the main thread, which submitit's signal handler interrupts,
        # never holds the pipe or the process's wait lock when `checkpoint` waits for the run.
        threading.Thread(target=self._relay, args=(tail,), daemon=True).start()
        while not self._ended.wait(1.0):
            pass
        returncode = self._proc.wait()
        if returncode != 0:
            raise RuntimeError(f"llmhpc {stage} of sweep task {job}_{task} exited with code {returncode}; last "
                               f"output:\n" + "\n".join(tail))
        return " ".join(overrides)

    def _relay(self, tail: collections.deque[str]) -> None:
        assert self._proc is not None and self._proc.stdout is not None and self._ended is not None
        for line in self._proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip("\n"))
        self._ended.set()

    def checkpoint(self, stage: str, overrides: list[str], workers: int, port_base: int, cwd: str,
                   stop_file: str = "") -> submitit.helpers.DelayedSubmission | None:
        """submitit's warning signal: stop the run after its step with a checkpoint, then requeue (None: not)."""
        if self._proc is None or self._ended is None or not stop_file:
            return None
        print(f"llmhpc: {time.strftime('%H:%M:%S')} warning signal: every rank finishes its step and checkpoints",
              flush=True)
        Path(stop_file).touch()
        self._ended.wait()
        verdict = Path(stop_file).read_text(encoding="utf-8").split() if Path(stop_file).exists() else []
        if verdict[:1] != ["stopped"]:
            print(f"llmhpc: not requeued: the run did not checkpoint a new step ({' '.join(verdict) or 'no step'})",
                  flush=True)
            return None
        print(f"llmhpc: {' '.join(verdict)}: requeueing", flush=True)
        return submitit.helpers.DelayedSubmission(PointRun(), stage, overrides, workers, port_base, cwd, stop_file)


def submit_sweep(stage: str, overrides: list[str], cluster_overrides: list[str],
                 dry_run: bool) -> tuple[str, Path | None]:
    """Expand, check every point, then submit them as one array job; returns (array job id, log folder), or (the
    summary, None) on a dry run. ConfigError / InputError in one line, with nothing submitted."""
    from llmhpc.config.load import load_config
    from llmhpc.stages.job_checks import require_sbatch, workers_per_node

    swept_cluster = expand(cluster_overrides)[1]
    if swept_cluster:
        raise ConfigError(f"{swept_cluster[0]} cannot be swept: one array job has one shape; give cluster.* one value "
                          f"each and submit one sweep per cluster shape")
    cluster = load_config("plan", cluster_overrides, sections=("cluster",), check_layout=False).cluster
    workers = workers_per_node(cluster)
    params = executor_parameters(stage, cluster)
    points, root = sweep_points(stage, overrides)
    check_points(stage, points, cluster)
    if dry_run:
        return describe(stage, points, root, params, workers), None
    require_sbatch()
    log_dir = root / "slurm"
    port_base = int(os.environ.get("LLMHPC_RDZV_PORT", "29500"))
    executor = submitit.AutoExecutor(folder=log_dir, cluster="slurm")
    executor.update_parameters(**params)
    n = len(points)
    try:
        stop_files = [str(log_dir / f"stop-{p.index}") for p in points]
        jobs = executor.map_array(PointRun(), [stage] * n, [list(p.overrides) for p in points], [workers] * n,
                                  [port_base] * n, [os.getcwd()] * n, stop_files)
    except submitit.core.utils.FailedJobError as exc:
        reason = (str(exc).strip().splitlines() or ["no message"])[-1]
        raise InputError(f"sbatch refused the sweep's array job ({log_dir}): {reason}") from None
    array_job = jobs[0].job_id.split("_")[0]
    record = {"stage": stage, "array_job_id": array_job, "log_dir": str(log_dir), "parameters": params,
              "rdzv_port_base": port_base,
              "points": [{"index": p.index, "task_id": job.job_id, "run_dir": str(p.run_dir),
                          "overrides": list(p.overrides), "swept": list(p.swept)} for p, job in zip(points, jobs,
                                                                                                   strict=True)]}
    (log_dir / "sweep.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return array_job, log_dir
