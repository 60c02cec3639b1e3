"""Activation checkpointing lowers peak memory without changing the loss (measured, fresh processes).

The model is shaped so activations dominate: 8 thin blocks, 16 x 256 tokens per micro-batch.
Peak resident memory of each run is read in its own process, after training (tests/peak_rss.py).
"""

from __future__ import annotations

import pytest

from tests.conftest import peak_rss_mib
from tests.distributed.launch import step_losses

SHAPE = ["model=tiny", "model.dim=64", "model.n_layers=8", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=256", "trainer.seq_len=256", "trainer.micro_batch_size=16", "trainer.global_batch_size=16",
         "trainer.max_steps=2", "trainer.ckpt_every=0", "trainer.eval_every=0", "logger.progress_bar=false",
         "run.device=cpu"]


@pytest.mark.slow  # CI time: tier 1 trains under ac=full in pp2_interleaved_ac
def test_full_ac_lowers_peak_memory_with_equal_loss(tmp_path, llmhpc_cache):
    peaks, losses = {}, {}
    for mode in ("none", "full"):
        run_dir = tmp_path / mode
        args = ["pretrain", *SHAPE, f"parallel.ac={mode}", f"run.dir={run_dir}"]
        peaks[mode] = peak_rss_mib(1, args, llmhpc_cache, tmp_path / f"peak_{mode}")
        losses[mode] = step_losses(run_dir)
    print(f"peak RSS: ac=none {peaks['none']:.0f} MiB, ac=full {peaks['full']:.0f} MiB")
    assert losses["full"] == losses["none"]  # recomputation repeats the same ops: bitwise equal
    assert peaks["full"] < peaks["none"] - 50, peaks
