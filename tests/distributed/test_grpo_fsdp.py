"""GRPO under FSDP2: the rollout engine gathers the sharded parameters once per `generate`, not once per token, and
samples what one process samples; `llmhpc grpo parallel.dp_shard=2` trains the losses of one process."""

from __future__ import annotations

import pytest

from llmhpc.metrics.jsonl import read_metrics
from tests.conftest import run_cli
from tests.distributed.launch import run_torchrun, spawn_gloo
from tests.integration.test_grpo import GRPO

SHAPE = {"vocab_size": 96, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 192, "max_seq_len": 64}


def _gather_scenarios(world: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llmhpc.config.schema import ModelConfig, ParallelConfig
    from llmhpc.models import build_model
    from llmhpc.parallel.fsdp import apply_fsdp
    from llmhpc.rl.rollout import RolloutEngine
    from llmhpc.rl.sampling import SamplingParams

    def generate_gathers_once() -> dict:
        torch.manual_seed(0)
        reference = build_model(ModelConfig(**SHAPE))
        torch.manual_seed(0)
        model = build_model(ModelConfig(**SHAPE))
        apply_fsdp(model, init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",)), ParallelConfig())
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
        gathers = 0
        plain = dist.all_gather_single

        def counted(*args, **kwargs):
            nonlocal gathers
            gathers += 1
            return plain(*args, **kwargs)

        dist.all_gather_single = counted
        try:
            engine = RolloutEngine(model, batch_size=2)
            ours = engine.generate(prompts, params)
        finally:
            dist.all_gather_single = plain
        expected = RolloutEngine(reference, batch_size=2).generate(prompts, params)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():  # resharded afterwards: a plain forward works and agrees
            after = float((model(ids) - reference(ids)).abs().max())
        return {"gathers": gathers, "forwards": engine.stats.forwards, "gather_seconds": engine.stats.gather_seconds,
                "same": [c.tokens for c in ours] == [c.tokens for c in expected], "after": after}

    return {"generate": generate_gathers_once}


def test_rollouts_gather_fsdp2_parameters_once(tmp_path):
    for rank in spawn_gloo(2, _gather_scenarios, tmp_path):
        result = rank["generate"]
        assert "error" not in result, result.get("error")
        # Three FSDP units (two blocks and the root) gathered once each, over some ten forwards.
        assert result["gathers"] == 3 and result["forwards"] >= 8, result
        assert result["same"] and result["after"] <= 1e-5 and result["gather_seconds"] > 0


def test_grpo_under_fsdp2_trains_the_losses_of_one_process(tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    args = ["grpo", f"model.init_from={tp2_pp2_checkpoint}", *GRPO, "trainer.max_steps=3", "trainer.ckpt_every=0"]
    run_cli([*args, f"run.dir={tmp_path / 'one'}"], llmhpc_cache)
    run_torchrun(2, [*args, "parallel.dp_shard=2", f"run.dir={tmp_path / 'two'}"], llmhpc_cache)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["reward"] for r in one] == [r["reward"] for r in two]  # the same answers sampled
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["completion_length"] == a["completion_length"]
    assert all(r["gather_seconds"] > 0 for r in two) and all(r["gather_seconds"] == 0 for r in one)


def test_dynamic_sampling_under_fsdp2_keeps_the_ranks_in_step(tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    """Ranks drop different numbers of groups, so they need different numbers of sampling rounds; every round
    gathers the sharded parameters (a collective), so a rank already full keeps sampling nothing until all are
    full. Without that the run hangs."""
    run = tmp_path / "dynamic"
    run_torchrun(2, ["grpo", f"model.init_from={tp2_pp2_checkpoint}", *GRPO, "trainer.max_steps=3",
                     "trainer.ckpt_every=0", "dynamic_sampling=true", "max_draws=6",
                     "reward=[tests.grpo_rewards.odd_length_unless_even_answer]", "parallel.dp_shard=2",
                     f"run.dir={run}"], llmhpc_cache, timeout=600)
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 3 and any(r["dynamic_dropped"] > 0 for r in records)
    assert all(0 < r["reward"] < 1 for r in records)  # only informative groups trained
