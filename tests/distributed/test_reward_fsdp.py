"""`llmhpc reward` under FSDP2 on 2 gloo ranks trains the losses of one process (the score head is drawn once and
sharded; the pairs are split over the ranks)."""

from __future__ import annotations

import pytest

from llmhpc.metrics.jsonl import read_metrics
from tests.conftest import run_cli
from tests.distributed.launch import run_torchrun
from tests.integration.test_reward import REWARD


def test_reward_under_fsdp2_trains_the_losses_of_one_process(tp2_pp2_checkpoint, pairs_file, llmhpc_cache, tmp_path):
    args = ["reward", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={pairs_file}", *REWARD,
            "trainer.micro_batch_size=1", "trainer.max_steps=3", "trainer.ckpt_every=0", "trainer.eval_every=0"]
    run_cli([*args, f"run.dir={tmp_path / 'one'}"], llmhpc_cache)
    run_torchrun(2, [*args, "parallel.dp_shard=2", f"run.dir={tmp_path / 'two'}"], llmhpc_cache)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    assert one[0]["loss"] != one[2]["loss"]  # it trains: the comparison is not of three equal numbers
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["score_gap"] == pytest.approx(a["score_gap"], rel=1e-3, abs=1e-5)
