"""Launch `llmhpc` the way users do on one node: `torchrun --nproc-per-node N -m llmhpc ...`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from llmhpc.checkpoint.manager import step_dir_name
from llmhpc.metrics.jsonl import read_metrics
from tests.conftest import REPO, cli_env


def run_torchrun(nproc: int, args: list[str], cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc -m llmhpc ARGS` (a free rendezvous port, real processes).

    One thread per rank: the test machines have 2 cores, so more threads only oversubscribe them.
    """
    env = cli_env(cache)
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "llmhpc", *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun -m llmhpc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def copy_run_stopped_at(run_dir: Path, dest: Path, step: int) -> None:
    """Copy `run_dir` to `dest` without its checkpoints after `step`, as if the run had been stopped there."""
    shutil.copytree(run_dir, dest, dirs_exist_ok=True)
    for ckpt in (Path(dest) / "checkpoints").iterdir():
        if ckpt.name > step_dir_name(step):
            shutil.rmtree(ckpt)
