"""A checkpoint saved under one layout resumes under another (and loads into one process) exactly.

The constant schedule makes the learning rate independent of max_steps, so a run saved at step 5
and resumed to step 6 must give the uninterrupted run's step-6 loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmhpc.checkpoint import load_model_state, read_checkpoint_config
from llmhpc.checkpoint.manager import step_dir_name
from llmhpc.models import Llama
from tests.conftest import SMALL_RUN, run_cli
from tests.distributed.launch import run_torchrun, step_losses

TOL = 1e-5
WEIGHT_TOL = 1e-4
"""Weights after 5 AdamW steps: Adam divides by sqrt(v), so a rounding-level gradient difference on a
near-zero gradient entry moves that weight by up to ~lr (3e-3); 1e-4 still catches any wrong shard."""
COMMON = [*SMALL_RUN, "trainer.schedule=constant", "trainer.global_batch_size=8", "trainer.ckpt_every=5"]


def weights(step_dir) -> dict[str, torch.Tensor]:
    model = Llama(read_checkpoint_config(step_dir).model)
    load_model_state(step_dir, model)
    return model.state_dict()


def sharded_run(tmp_path: Path, cache: Path) -> tuple[Path, Path]:
    """An uninterrupted one-process run to step 6 and a dp_shard=2 run stopped after its step-5 checkpoint."""
    reference, sharded = tmp_path / "reference", tmp_path / "sharded"
    run_cli(["pretrain", *COMMON, "trainer.max_steps=6", "trainer.micro_batch_size=4", f"run.dir={reference}"], cache)
    run_torchrun(2, ["pretrain", *COMMON, "trainer.max_steps=5", "parallel.dp_shard=2", "trainer.micro_batch_size=2",
                     f"run.dir={sharded}"], cache)
    return reference, sharded


def assert_uninterrupted_losses(run_dir, reference) -> None:
    expected, got = step_losses(reference), step_losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    diffs = [abs(got[s] - expected[s]) for s in got]
    print(f"{run_dir.name}: step-6 |diff| = {abs(got[6] - expected[6]):.2e}, max over steps {max(diffs):.2e}")
    assert max(diffs) < TOL, (run_dir.name, diffs)


def test_fsdp_checkpoint_loads_and_resumes_in_one_process(tmp_path, llmhpc_cache):
    reference, sharded = sharded_run(tmp_path, llmhpc_cache)
    # the sharded checkpoint loads into one process with the single-process run's weights
    ref_w = weights(reference / "checkpoints" / step_dir_name(5))
    got_w = weights(sharded / "checkpoints" / step_dir_name(5))
    assert ref_w.keys() == got_w.keys()
    worst = max(float((ref_w[k] - got_w[k]).abs().max()) for k in ref_w)
    print(f"dp_shard=2 step-5 weights vs single process: max |diff| = {worst:.2e}")
    assert worst < WEIGHT_TOL, f"weights differ by {worst}"

    resumed = run_cli(["pretrain", *COMMON, "trainer.max_steps=6", "trainer.micro_batch_size=4", f"run.dir={sharded}"],
                      llmhpc_cache)
    assert "resumed from" in resumed.stdout
    assert_uninterrupted_losses(sharded, reference)


@pytest.mark.slow  # CI time: tier 1 resumes the FSDP2 checkpoint in one process (above)
def test_fsdp_checkpoint_resumes_under_ddp(tmp_path, llmhpc_cache):
    reference, sharded = sharded_run(tmp_path, llmhpc_cache)
    run_torchrun(2, ["pretrain", *COMMON, "trainer.max_steps=6", "parallel.dp_replicate=2", "parallel.dp_shard=1",
                     "trainer.micro_batch_size=2", f"run.dir={sharded}"], llmhpc_cache)
    assert_uninterrupted_losses(sharded, reference)
