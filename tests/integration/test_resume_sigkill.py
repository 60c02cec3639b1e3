"""A run killed with SIGKILL, or stopped with SIGTERM (what Slurm sends at a time limit or `scancel`), and restarted
with the same command ends bitwise where an uninterrupted run ends: same per-step losses, same final weights (fp32,
single process). SIGTERM is not a crash: the run finishes its step, checkpoints it and exits with status 75."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from llmhpc.checkpoint import latest_checkpoint
from llmhpc.metrics.jsonl import read_metrics
from llmhpc.train.preemption import STOPPED_EXIT_CODE
from tests.conftest import REPO, SMALL_RUN, cli_env, run_cli
from tests.distributed.launch import final_weights

STEPS = 20
CKPT_EVERY = 10


def args_for(run_dir) -> list[str]:
    return ["pretrain", *SMALL_RUN, f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={CKPT_EVERY}",
            "trainer.micro_batch_size=8", "trainer.global_batch_size=16", "trainer.seq_len=128",
            "trainer.keep_last=2", f"run.dir={run_dir}"]


def losses(run_dir) -> dict[int, float]:
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "metrics.jsonl must hold each step once after a resume"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llmhpc_cache):
    """The uninterrupted run both tests compare against."""
    reference_dir = tmp_path_factory.mktemp("reference")
    run_cli(args_for(reference_dir), llmhpc_cache)
    return reference_dir


def signal_mid_run(run_dir, cache, sig: int, after_step: int) -> tuple[subprocess.Popen, int | None, str]:
    """Start the run, send `sig` once metrics show `after_step`; (process, last logged step then, its stdout)."""
    proc = subprocess.Popen([sys.executable, "-m", "llmhpc", *args_for(run_dir)], cwd=REPO, env=cli_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    signalled_at = None
    while time.time() < deadline and proc.poll() is None:
        done = read_metrics(metrics) if metrics.exists() else []
        if done and done[-1]["step"] >= after_step:
            signalled_at = done[-1]["step"]
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, _ = proc.communicate(timeout=120)
    return proc, signalled_at, stdout


def assert_matches(reference_dir, run_dir) -> None:
    expected, got = losses(reference_dir), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    differing = [step for step in expected if got[step] != expected[step]]
    assert not differing, f"losses differ at {differing}"
    assert expected[STEPS] < expected[1] - 1.0  # and it learned something on the real corpus
    ref_weights, new_weights = final_weights(reference_dir), final_weights(run_dir)
    assert ref_weights.keys() == new_weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], new_weights[name]), name


def test_sigterm_checkpoints_the_step_exits_75_and_resumes_bitwise(reference, tmp_path, llmhpc_cache):
    run_dir = tmp_path / "stopped"
    proc, signalled_at, stdout = signal_mid_run(run_dir, llmhpc_cache, signal.SIGTERM, 3)
    assert signalled_at is not None and proc.returncode == STOPPED_EXIT_CODE, (proc.returncode, stdout[-2000:])
    stopped_at = latest_checkpoint(run_dir / "checkpoints").name
    step = int(stopped_at.split("_")[1])
    # The step in flight when the signal came is finished and saved (whether or not ckpt_every was due).
    assert signalled_at <= step < STEPS, (signalled_at, stopped_at)
    assert f"stopped on SIGTERM: step {step}," in stdout and "run the same command to resume" in stdout
    assert max(losses(run_dir)) == step
    resumed = run_cli(args_for(run_dir), llmhpc_cache)
    assert f"(step {step})" in resumed.stdout and f"done: step {STEPS}" in resumed.stdout
    assert_matches(reference, run_dir)


@pytest.mark.slow  # CI time: tier 1 resumes bit for bit after SIGTERM, and every stage resumes
def test_sigkill_then_same_command_matches_uninterrupted_run(reference, tmp_path, llmhpc_cache):
    killed_dir = tmp_path / "killed"
    proc, killed_at, _ = signal_mid_run(killed_dir, llmhpc_cache, signal.SIGKILL, CKPT_EVERY + 3)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    assert killed_at < STEPS
    assert latest_checkpoint(killed_dir / "checkpoints").name == f"step_{CKPT_EVERY:07d}"  # killed before step 20

    resumed = run_cli(args_for(killed_dir), llmhpc_cache)
    assert "resumed from" in resumed.stdout

    assert_matches(reference, killed_dir)
