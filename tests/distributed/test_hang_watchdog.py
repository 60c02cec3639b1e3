"""A real hang: one rank of a 2-process torchrun run is frozen (SIGSTOP, as a stuck node looks to its peers) while
the other waits for it in a collective. The other rank's heartbeat watchdog must name the frozen rank from the
records in `<run.dir>/heartbeat/` and end the run (status 124) long before the collective timeout would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmhpc.metrics.jsonl import read_metrics
from tests.conftest import REPO, SMALL_RUN, cli_env


@pytest.mark.slow  # CI time: waits out a real watchdog timeout
def test_frozen_rank_is_named_and_the_run_ends(tmp_path, llmhpc_cache):
    run_dir = tmp_path / "run"
    env = dict(cli_env(llmhpc_cache), OMP_NUM_THREADS="1")
    stderr = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "llmhpc",
               "pretrain", *SMALL_RUN, "parallel.dp_shard=2", "trainer.max_steps=100000", "trainer.ckpt_every=0",
               "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "run.hang_timeout_s=20",
               "run.collective_timeout_s=300", f"run.dir={run_dir}"]
    with stderr.open("w") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    frozen = None
    try:
        deadline = time.monotonic() + 240
        metrics, record = run_dir / "metrics.jsonl", run_dir / "heartbeat" / "rank00001.json"
        while time.monotonic() < deadline and proc.poll() is None:
            done = read_metrics(metrics) if metrics.exists() else []
            if record.exists() and done and done[-1]["step"] >= 3:
                frozen = json.loads(record.read_text())["pid"]
                os.kill(frozen, signal.SIGSTOP)
                break
            time.sleep(0.1)
        assert frozen is not None, f"the run did not reach step 3: {stderr.read_text()[-3000:]}"
        frozen_at = time.monotonic()
        while time.monotonic() < deadline and "no training progress" not in stderr.read_text():
            time.sleep(0.2)
        waited = time.monotonic() - frozen_at
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGKILL)  # torchrun's SIGTERM stays pending on a stopped process
        proc.wait(timeout=120)
    message = next(line for line in stderr.read_text().splitlines() if "no training progress" in line)
    assert message.startswith("llmhpc: no training progress on rank 0 for "), message
    assert "rank 1 stopped writing heartbeats" in message and "run.hang_timeout_s" in message, message
    assert waited < 90, f"the watchdog took {waited:.0f} s for a 20 s timeout"
    assert proc.returncode != 0
