"""Launch `llmhpc` the way users do on one node: `torchrun --nproc-per-node N -m llmhpc ...`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
