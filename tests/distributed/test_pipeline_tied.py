"""Pipeline parallel with tied embeddings (the tiny model and SmolLM2 tie them), Megatron's way.

The last stage holds a copy of the embedding matrix as its head; the embedding's and the copy's gradients
are summed across the first and last stage before each step, the gradient norm counts the matrix once, and
checkpoints keep one tensor. So pp=2 must give one process's per-step losses (fp32, 1e-5), under 1f1b
(embedding and copy on different ranks), zbv (rank 0 holds both ends of the V) and tp=2 x pp=2, and a pp=2 checkpoint
must continue with the uninterrupted losses in one process and under tp=2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmhpc.checkpoint import load_model_state, read_checkpoint_config
from llmhpc.checkpoint.manager import step_dir_name
from llmhpc.models import Llama
from tests.conftest import SMALL_RUN, marking_slow, run_cli
from tests.distributed.launch import copy_run_stopped_at, run_torchrun, step_losses

STEPS = 6
TOL = 1e-5
COMMON = [
    *SMALL_RUN,
    "model.n_layers=4",
    "model.tie_embeddings=true",
    f"trainer.max_steps={STEPS}",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.ckpt_every=3",
    "trainer.keep_last=5",
    "trainer.grad_clip=0.5",
]
"""grad_clip 0.5 clips in every step here, so a norm that counted the tied matrix twice would show."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llmhpc_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    run_cli(["pretrain", *COMMON, f"run.dir={run_dir}"], llmhpc_cache)
    return run_dir


LAYOUTS = {  # name: (processes, overrides on top of pp=2)
    "1f1b": (2, ["parallel.pp_schedule=1f1b"]),
    "zbv": (2, ["parallel.pp_schedule=zbv"]),
    # TP hands the embedding's gradient back as partial sums over the TP ranks: it must be laid out like the
    # weight before the sum with the head copy (a mismatch here once hung the run)
    "tp2_1f1b": (4, ["parallel.pp_schedule=1f1b", "parallel.tp=2"]),
}


SLOW_LAYOUTS = ("zbv", "tp2_1f1b")
"""Left to the slow tier (CI time); tier 1 keeps 1f1b, where the embedding and its copy sit on different ranks."""


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory, llmhpc_cache):
    """The run dir of a layout's tied pp=2 run (checkpoints at steps 3 and 6), launched when first asked for."""
    runs: dict[str, Path] = {}

    def run_of(name: str) -> Path:
        if name not in runs:
            nproc, overrides = LAYOUTS[name]
            run_dir = tmp_path_factory.mktemp(name)
            run_torchrun(nproc, ["pretrain", *COMMON, "parallel.pp=2", *overrides, f"run.dir={run_dir}"],
                         llmhpc_cache, timeout=600)
            runs[name] = run_dir
        return runs[name]

    return run_of


def _worst(got: dict[int, float], expected: dict[int, float], steps) -> float:
    return max(abs(got[s] - expected[s]) for s in steps)


@pytest.mark.parametrize("layout", marking_slow(LAYOUTS, SLOW_LAYOUTS))
def test_tied_pipeline_matches_one_process(layout, reference, pipelined):
    run_dir = pipelined(layout)
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = _worst(got, step_losses(reference), range(1, STEPS + 1))
    print(f"tied pp=2 {layout}: max |loss - one process| = {worst:.2e}")
    assert worst < TOL, worst
    # One tensor for the tied matrix in the checkpoint, equal to the one process's within AdamW's rounding.
    step_dir = run_dir / "checkpoints" / step_dir_name(STEPS)
    model = Llama(read_checkpoint_config(step_dir).model)
    load_model_state(step_dir, model)
    assert "output.weight" not in model.state_dict()
    expected = Llama(read_checkpoint_config(step_dir).model)
    load_model_state(reference / "checkpoints" / step_dir_name(STEPS), expected)
    diff = (model.tok_embeddings.weight - expected.tok_embeddings.weight).abs().max()
    assert diff < 1e-3, diff


@pytest.mark.parametrize(("nproc", "layout"), [(1, []), (2, ["parallel.tp=2"])], ids=["one_process", "tp2"])
def test_tied_pipeline_checkpoint_continues_elsewhere(nproc, layout, reference, pipelined, tmp_path, llmhpc_cache):
    copy_run_stopped_at(pipelined("1f1b"), tmp_path, 3)
    if nproc == 1:
        proc = run_cli(["pretrain", *COMMON, f"run.dir={tmp_path}"], llmhpc_cache)
    else:
        proc = run_torchrun(nproc, ["pretrain", *COMMON, *layout, f"run.dir={tmp_path}"], llmhpc_cache)
    assert "resumed from" in proc.stdout and "(step 3)" in proc.stdout
    worst = _worst(step_losses(tmp_path), step_losses(reference), range(4, STEPS + 1))
    print(f"tied pp=2 step 3 -> {layout or 'one process'}: max |loss - uninterrupted| = {worst:.2e}")
    assert worst < TOL, worst


def test_tied_one_process_checkpoint_resumes_under_pp(reference, tmp_path, llmhpc_cache):
    """The other way: a one-process tied checkpoint fills both the embedding and the last stage's copy."""
    copy_run_stopped_at(reference, tmp_path, 3)
    proc = run_torchrun(2, ["pretrain", *COMMON, "parallel.pp=2", f"run.dir={tmp_path}"], llmhpc_cache)
    assert "resumed from" in proc.stdout
    worst = _worst(step_losses(tmp_path), step_losses(reference), range(4, STEPS + 1))
    assert worst < TOL, worst
    assert torch.isfinite(torch.tensor(list(step_losses(tmp_path).values()))).all()
