"""`llmhpc grpo` end to end on the tiny model (trained 2 steps under tp=2 x pp=2, SmolLM2's tokenizer): several
updates per rollout resume bitwise after a stop between them, the reference policy is the starting model (the
adapter-disabled base for LoRA, a frozen copy otherwise), and bad rewards or batch shapes stop in one line.

Rewards are named by dotted path (`tests.grpo_rewards`): a random model never answers arithmetic right.
"""

from __future__ import annotations

import pytest
import torch

from llmhpc.checkpoint import latest_checkpoint
from llmhpc.metrics.jsonl import read_metrics
from llmhpc.models import load_pretrained
from tests.conftest import one_line_error, run_cli
from tests.distributed.launch import copy_run_stopped_at, step_losses

GRPO = ["reward=[tests.grpo_rewards.odd_length]", "group_size=4", "max_new_tokens=8", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", "trainer.seq_len=128", "trainer.eval_every=0", "trainer.lr=1e-2",
        "logger.progress_bar=false", "run.device=cpu"]


def test_updates_per_rollout_resume_bitwise_between_two_updates(tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    common = ["grpo", f"model.init_from={tp2_pp2_checkpoint}", *GRPO, "updates_per_rollout=2",
              "trainer.max_steps=4", "trainer.ckpt_every=1", "clip_high=0.28"]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    run_cli([*common, f"run.dir={run}"], llmhpc_cache)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["rollout"] for r in records] == [1, 1, 2, 2]
    # A first update has ratio 1, so its loss is the mean advantage (~0); the second one's is not.
    assert all(0 <= r["reward"] <= 1 for r in records) and records[1]["loss"] != 0 != records[3]["loss"]
    for name in ("reward_odd_length", "reward_std", "zero_std_fraction", "entropy", "clip_low", "clip_high",
                 "completion_length", "completion_length_max", "truncated", "rollout_tokens_per_s",
                 "gather_seconds"):
        assert name in records[0], name
    # The second update of a rollout trains the same answers on moved weights: ratios leave 1 and get clipped.
    assert records[1]["clip_low"] + records[1]["clip_high"] > 0 == records[0]["clip_low"] + records[0]["clip_high"]

    # Stopped after step 3 (between rollout 2's two updates) and started again: the same run, bit for bit.
    copy_run_stopped_at(run, resumed, 3)
    proc = run_cli([*common, f"run.dir={resumed}"], llmhpc_cache)
    assert "resumed from" in proc.stdout
    assert step_losses(resumed) == step_losses(run)
    ours, _ = load_pretrained(run)
    again, _ = load_pretrained(resumed)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values(), strict=True))
    assert latest_checkpoint(resumed / "checkpoints").name == "step_0000004"


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_kl_is_to_the_starting_model(peft, tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    """beta > 0: at step 1 the policy is the reference (LoRA's B = 0, or the copy read from init_from), so the KL
    is 0; once the policy moved it is positive."""
    run = tmp_path / peft
    extra = ["peft=lora", "peft.rank=4", "peft.dropout=0"] if peft == "lora" else []
    run_cli(["grpo", f"model.init_from={tp2_pp2_checkpoint}", *GRPO, *extra, "beta=0.1", "trainer.max_steps=3",
             f"run.dir={run}"], llmhpc_cache)
    kl = [r["kl"] for r in read_metrics(run / "metrics.jsonl")]
    assert abs(kl[0]) < 1e-6 < kl[2], kl
    if peft == "lora":
        assert (run / "adapter" / "adapter_config.json").is_file()


def test_bad_rewards_and_batches_stop_in_one_line(tp2_pp2_checkpoint, llmhpc_cache, tmp_path, capsys):
    base = ["grpo", f"model.init_from={tp2_pp2_checkpoint}", *GRPO, f"run.dir={tmp_path / 'x'}"]
    one_line_error(capsys, [*base, "reward=[corect]"], "unknown reward 'corect'", "correct")
    one_line_error(capsys, [*base, "reward=[correct:lots]"], "correct:lots", "weight")
    one_line_error(capsys, [*base, "group_size=3"], "trainer.global_batch_size=8", "grpo.group_size=3")
    one_line_error(capsys, [*base, "reward=[tests.grpo_rewards.broken]", "trainer.max_steps=1"],
                   "reward 'tests.grpo_rewards.broken' raised KeyError")
