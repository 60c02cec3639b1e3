"""`parallel.engine=deepspeed` from the CLI: ZeRO-1/2/3 reproduce the single-process run, checkpoints interchange.

`torchrun -m llmhpc pretrain parallel.engine=deepspeed parallel.zero_stage=N` on 2 ranks, 2 micro-batches
per rank per step, fp32, gradient clipping on: per-step losses must match one process within 1e-5. The
DeepSpeed checkpoints are ordinary llmhpc DCP checkpoints: one written under ZeRO-3 resumes in one plain
process, and one written by a plain process resumes under ZeRO-1, both with the uninterrupted losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SMALL_RUN, run_cli
from tests.distributed.launch import copy_run_stopped_at, run_torchrun, step_losses

pytest.importorskip("deepspeed", reason="DeepSpeed is the [deepspeed] extra (tools/install.sh installs it)")

STEPS = 6
TOL = 1e-5
COMMON = [*SMALL_RUN, f"trainer.max_steps={STEPS}", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
          "trainer.ckpt_every=3", "trainer.keep_last=5", "trainer.grad_clip=0.5"]


def deepspeed_args(stage: int) -> list[str]:
    return ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llmhpc_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    run_cli(["pretrain", *COMMON, f"run.dir={run_dir}"], llmhpc_cache)
    return run_dir


def max_diff(got: dict[int, float], expected: dict[int, float], steps) -> float:
    return max(abs(got[s] - expected[s]) for s in steps)


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow), 3])  # ZeRO-2: slow tier (CI time)
def test_zero_stage_matches_single_process(stage, reference, tmp_path, llmhpc_cache):
    run_torchrun(2, ["pretrain", *COMMON, *deepspeed_args(stage), f"run.dir={tmp_path}"], llmhpc_cache)
    got, expected = step_losses(tmp_path), step_losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max_diff(got, expected, range(1, STEPS + 1))
    print(f"ZeRO-{stage}: max |loss - single| = {worst:.2e} over {STEPS} steps")
    assert worst < TOL, worst


def test_zero3_checkpoint_resumes_in_one_process(reference, tmp_path, llmhpc_cache):
    run_torchrun(2, ["pretrain", *COMMON, *deepspeed_args(3), "trainer.max_steps=3", f"run.dir={tmp_path}"],
                 llmhpc_cache)
    proc = run_cli(["pretrain", *COMMON, f"run.dir={tmp_path}"], llmhpc_cache)
    assert "resumed from" in proc.stdout
    worst = max_diff(step_losses(tmp_path), step_losses(reference), range(4, STEPS + 1))
    print(f"ZeRO-3 step 3 → 1 process: max |loss - uninterrupted| over steps 4-{STEPS} = {worst:.2e}")
    assert worst < TOL, worst


@pytest.mark.slow  # CI time: tier 1 resumes ZeRO-3 in one process
def test_single_process_checkpoint_resumes_under_zero1(reference, tmp_path, llmhpc_cache):
    copy_run_stopped_at(reference, tmp_path, 3)
    proc = run_torchrun(2, ["pretrain", *COMMON, *deepspeed_args(1), f"run.dir={tmp_path}"], llmhpc_cache)
    assert "resumed from" in proc.stdout
    worst = max_diff(step_losses(tmp_path), step_losses(reference), range(4, STEPS + 1))
    print(f"1 process step 3 → ZeRO-1: max |loss - uninterrupted| over steps 4-{STEPS} = {worst:.2e}")
    assert worst < TOL, worst
