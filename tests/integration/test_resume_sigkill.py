"""A run killed with SIGKILL and restarted with the same command ends bitwise where an
uninterrupted run ends: same per-step losses, same final weights (fp32, single process)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch

from llmhpc.checkpoint import latest_checkpoint, load_model_state, read_checkpoint_config
from llmhpc.metrics.jsonl import read_metrics
from llmhpc.models import Llama
from tests.conftest import REPO, SMALL_RUN, cli_env, run_cli

STEPS = 40
CKPT_EVERY = 10


def args_for(run_dir) -> list[str]:
    return ["pretrain", *SMALL_RUN, f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={CKPT_EVERY}",
            "trainer.micro_batch_size=8", "trainer.global_batch_size=16", "trainer.seq_len=128",
            "trainer.keep_last=2", f"run.dir={run_dir}"]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    step_dir = latest_checkpoint(run_dir / "checkpoints")
    model = Llama(read_checkpoint_config(step_dir).model)
    load_model_state(step_dir, model)
    return model.state_dict()


def losses(run_dir) -> dict[int, float]:
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "metrics.jsonl must hold each step once after a resume"
    return {r["step"]: r["loss"] for r in records}


def test_sigkill_then_same_command_matches_uninterrupted_run(tmp_path, llmhpc_cache):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run_cli(args_for(reference_dir), llmhpc_cache)

    proc = subprocess.Popen([sys.executable, "-m", "llmhpc", *args_for(killed_dir)], cwd=REPO,
                            env=cli_env(llmhpc_cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        done = read_metrics(metrics) if metrics.exists() else []
        if done and done[-1]["step"] >= CKPT_EVERY + 3:
            killed_at = done[-1]["step"]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    assert killed_at < STEPS
    assert latest_checkpoint(killed_dir / "checkpoints").name == f"step_{CKPT_EVERY:07d}" or killed_at >= 2 * CKPT_EVERY

    resumed = run_cli(args_for(killed_dir), llmhpc_cache)
    assert "resumed from" in resumed.stdout

    expected, got = losses(reference_dir), losses(killed_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    differing = [step for step in expected if got[step] != expected[step]]
    resumed_step = resumed.stdout.split("(step ")[1].split(")")[0]
    assert not differing, f"killed at step {killed_at}, resumed from {resumed_step}; losses differ at {differing}"
    assert expected[STEPS] < expected[1] - 1.0  # and it learned something on the real corpus
    ref_weights, new_weights = final_weights(reference_dir), final_weights(killed_dir)
    assert ref_weights.keys() == new_weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], new_weights[name]), name
