"""Launch real processes: `llmhpc` the way users do on one node (`torchrun --nproc-per-node N -m llmhpc ...`),
or test scenarios in-process on N gloo ranks (`spawn_gloo`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmhpc.checkpoint import latest_checkpoint, load_model_state, read_checkpoint_config
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


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's newest checkpoint (of any layout), as one process holds them."""
    from llmhpc.models import Llama

    step_dir = latest_checkpoint(Path(run_dir) / "checkpoints")
    model = Llama(read_checkpoint_config(step_dir).model)
    load_model_state(step_dir, model)
    return model.state_dict()


def copy_run_stopped_at(run_dir: Path, dest: Path, step: int) -> None:
    """Copy `run_dir` to `dest` without its checkpoints after `step`, as if the run had been stopped there."""
    shutil.copytree(run_dir, dest, dirs_exist_ok=True)
    for ckpt in (Path(dest) / "checkpoints").iterdir():
        if ckpt.name > step_dir_name(step):
            shutil.rmtree(ckpt)


Scenarios = Callable[[int], dict[str, Callable[[], Any]]]
"""Called in every rank with the world size once the process group is up: {name: scenario}."""


def spawn_gloo(world: int, scenarios: Scenarios, out: Path) -> list[dict[str, Any]]:
    """Run every scenario on `world` real gloo processes (one thread each), all ranks in step.

    `scenarios` must be a module-level function (it is pickled into the ranks). Returns, per rank,
    {name: what the scenario returned (JSON), or {"error": its traceback}}.
    """
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(world, port, str(out), scenarios), nprocs=world, join=True)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def _gloo_rank(rank: int, world: int, port: int, out: str, scenarios: Scenarios) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["WORLD_SIZE"] = str(world)  # as torchrun sets it: llmhpc's config checks layouts against it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {}
        for name, scenario in scenarios(world).items():
            try:
                results[name] = scenario()
            except Exception:  # noqa: BLE001 - recorded and reported by the scenario's test
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
