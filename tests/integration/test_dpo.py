"""`llmhpc dpo` end to end on the tiny model (trained 2 steps under tp=2 x pp=2, SmolLM2's tokenizer): the
reference log-probs are computed once and read back from the cache by a later run, a run stopped between steps
resumes bit for bit, LoRA works without a second model, and bad options or data stop in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llmhpc.metrics.jsonl import read_metrics
from llmhpc.models import load_pretrained
from tests.conftest import one_line_error, run_cli
from tests.distributed.launch import copy_run_stopped_at, step_losses

DPO = ["trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.seq_len=160", "trainer.lr=1e-3",
       "trainer.warmup_steps=0", "trainer.eval_every=2", "logger.progress_bar=false", "run.device=cpu"]


def test_dpo_caches_the_reference_and_resumes_bitwise(tp2_pp2_checkpoint, pairs_file, llmhpc_cache, tmp_path):
    (tmp_path / "data").mkdir()
    pairs_file = Path(shutil.copy(pairs_file, tmp_path / "data" / "pairs.jsonl"))  # a cache of its own
    common = ["dpo", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={pairs_file}", "data.val_fraction=0.2",
              *DPO, "trainer.max_steps=4", "trainer.ckpt_every=1"]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    first = run_cli([*common, f"run.dir={run}"], llmhpc_cache)
    assert "pairs computed, cached in" in first.stdout
    assert list(pairs_file.parent.glob(".pairs.jsonl.reference-*.safetensors"))  # beside the data
    records = read_metrics(run / "metrics.jsonl")
    for name in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                 "eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
        assert name in records[1], name
    # Step 1: the policy is the reference, so every implicit reward is 0 and the loss is log 2.
    assert abs(records[0]["reward_margin"]) < 1e-5 and records[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    evals = [r for r in records if "eval_loss" in r]  # after steps 2 and 4: the held-out pairs ranked better
    assert len(evals) == 2 and all(r["eval_loss"] < 0.69305 and r["eval_reward_margin"] > 0 for r in evals)

    copy_run_stopped_at(run, resumed, 2)
    proc = run_cli([*common, f"run.dir={resumed}"], llmhpc_cache)
    assert "read from the cache" in proc.stdout and "resumed from" in proc.stdout
    assert step_losses(resumed) == step_losses(run)
    ours, _ = load_pretrained(run)
    again, _ = load_pretrained(resumed)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values(), strict=True))


def test_lora_run_needs_no_second_model(tp2_pp2_checkpoint, pairs_file, llmhpc_cache, tmp_path):
    run = tmp_path / "run"
    run_cli(["dpo", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={pairs_file}", *DPO, "peft=lora",
             "peft.rank=4", "peft.dropout=0", "trainer.max_steps=3", "trainer.eval_every=0", f"run.dir={run}"],
            llmhpc_cache)
    records = read_metrics(run / "metrics.jsonl")
    # Adapters start at 0: the policy is the (adapter-disabled) base at step 1, and moves away from it after.
    assert abs(records[0]["reward_margin"]) < 1e-5 and records[2]["reward_margin"] != 0
    assert (run / "adapter").is_dir()


def test_dpo_errors_are_one_line(capsys, tmp_path, tp2_pp2_checkpoint):
    one_line_error(capsys, ["dpo", "loss=kto", f"model.init_from={tp2_pp2_checkpoint}"], "dpo.loss", "sigmoid")
    one_line_error(capsys, ["dpo", "beta=0", f"model.init_from={tp2_pp2_checkpoint}"], "dpo.beta")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n', encoding="utf-8")
    one_line_error(capsys, ["dpo", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={bad}",
                            "data.on_error=fail", f"run.dir={tmp_path / 'r'}", "run.device=cpu"],
                   f"{bad}, line 1", "chosen")
