"""Activation checkpointing lowers peak memory without changing the loss (measured, fresh processes).

The model is shaped so activations dominate: 8 thin blocks, 16 x 256 tokens per micro-batch.
Peak resident memory (VmHWM) of each run is read in its own process, after training (not ru_maxrss: Linux
carries it across exec, so a child of a large pytest process would report pytest's size).
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, cli_env
from tests.distributed.launch import step_losses

SHAPE = ["model=tiny", "model.dim=64", "model.n_layers=8", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=256", "trainer.seq_len=256", "trainer.micro_batch_size=16", "trainer.global_batch_size=16",
         "trainer.max_steps=2", "trainer.ckpt_every=0", "trainer.eval_every=0", "logger.progress_bar=false",
         "run.device=cpu"]

PEAK_RSS = (
    "import sys\n"
    "from llmhpc.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm_kib = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
    "print('peak_rss_mib', hwm_kib / 1024)\n"
    "sys.exit(rc)\n"
)


def peak_rss_mib(args: list[str], cache) -> float:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=REPO, env=cli_env(cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return float(proc.stdout.split("peak_rss_mib")[1].split()[0])


def test_full_ac_lowers_peak_memory_with_equal_loss(tmp_path, llmhpc_cache):
    peaks, losses = {}, {}
    for mode in ("none", "full"):
        run_dir = tmp_path / mode
        peaks[mode] = peak_rss_mib(["pretrain", *SHAPE, f"parallel.ac={mode}", f"run.dir={run_dir}"], llmhpc_cache)
        losses[mode] = step_losses(run_dir)
    print(f"peak RSS: ac=none {peaks['none']:.0f} MiB, ac=full {peaks['full']:.0f} MiB")
    assert losses["full"] == losses["none"]  # recomputation repeats the same ops: bitwise equal
    assert peaks["full"] < peaks["none"] - 50, peaks
