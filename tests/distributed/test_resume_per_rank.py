"""A 2-rank FSDP2 run whose ranks sample their data independently resumes after SIGKILL to the same losses.

With `data.sampling=random` each data-parallel rank draws its own windows from a generator seeded by its
rank, so a resume is exact only if every rank gets back its own data position (and RNG state), not rank
0's: the checkpoint keeps one entry per rank. The whole torchrun process group is killed mid-run (after
the first checkpoint), the same command resumes it, and its per-step losses must equal an uninterrupted
run's from the resumed step on (FSDP2 on gloo is deterministic for a fixed layout).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmhpc.checkpoint import latest_checkpoint
from llmhpc.metrics.jsonl import read_metrics
from tests.conftest import REPO, SMALL_RUN, cli_env
from tests.distributed.launch import run_torchrun, step_losses

STEPS, CKPT_EVERY = 12, 4


def args_for(run_dir) -> list[str]:
    return ["pretrain", *SMALL_RUN, "parallel.dp_shard=2", "data.sampling=random", f"trainer.max_steps={STEPS}",
            f"trainer.ckpt_every={CKPT_EVERY}", "trainer.keep_last=2", f"run.dir={run_dir}"]


@pytest.mark.slow  # SIGKILL resume is tier 1 (tests/integration/test_resume_sigkill.py); this adds per-rank sampling
def test_fsdp_with_per_rank_sampling_resumes_after_sigkill(tmp_path, llmhpc_cache):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_torchrun(2, args_for(reference), llmhpc_cache)
    meta = json.loads((latest_checkpoint(reference / "checkpoints") / "meta.json").read_text())
    positions = [rank["data"]["bit_generator"]["state"]["state"] for rank in meta["ranks"]]
    assert len(positions) == 2 and positions[0] != positions[1], "each rank keeps its own data position"

    env = dict(cli_env(llmhpc_cache), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "llmhpc",
               *args_for(killed)]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    metrics, killed_at = killed / "metrics.jsonl", None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = read_metrics(metrics) if metrics.exists() else []
        if done and done[-1]["step"] >= CKPT_EVERY + 2:
            killed_at = done[-1]["step"]
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, at once
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    log.close()
    tail = (tmp_path / "killed.log").read_text()[-3000:]
    assert killed_at is not None and killed_at < STEPS, f"the run must be killed mid-training:\n{tail}"

    resumed = run_torchrun(2, args_for(killed), llmhpc_cache)
    assert "resumed from" in resumed.stdout
    expected, got = step_losses(reference), step_losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    differing = {step: (got[step], expected[step]) for step in expected if abs(got[step] - expected[step]) > 1e-6}
    assert not differing, f"killed at step {killed_at}; losses differ at {differing}"
