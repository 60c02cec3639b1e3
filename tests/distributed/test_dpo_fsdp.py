"""`llmhpc dpo` under FSDP2 on 2 gloo ranks trains the losses of one process: the reference pass (every rank
scores every pair, parameters gathered once) and the pair split over ranks give the same steps."""

from __future__ import annotations

import shutil

import pytest

from llmhpc.metrics.jsonl import read_metrics
from tests.conftest import run_cli
from tests.distributed.launch import run_torchrun
from tests.integration.test_dpo import DPO


def test_dpo_under_fsdp2_trains_the_losses_of_one_process(tp2_pp2_checkpoint, pairs_file, llmhpc_cache, tmp_path):
    # Each run gets its own copy of the data, so each computes (and caches) the reference itself.
    sources = {}
    for name in ("one", "two"):
        (tmp_path / f"data_{name}").mkdir()
        sources[name] = shutil.copy(pairs_file, tmp_path / f"data_{name}" / "pairs.jsonl")
    args = ["dpo", f"model.init_from={tp2_pp2_checkpoint}", *DPO, "trainer.micro_batch_size=1",
            "trainer.max_steps=2", "trainer.ckpt_every=0", "trainer.eval_every=0"]
    run_cli([*args, f"data.source={sources['one']}", f"run.dir={tmp_path / 'one'}"], llmhpc_cache)
    proc = run_torchrun(2, [*args, f"data.source={sources['two']}", "parallel.dp_shard=2",
                            f"run.dir={tmp_path / 'two'}"], llmhpc_cache)
    assert "pairs computed, cached in" in proc.stdout
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-3, abs=1e-5)
