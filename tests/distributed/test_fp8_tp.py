"""precision=fp8 under tensor + sequence parallel (gloo, real processes) against the one-process float8 model.

The CLI refuses fp8 on CPU (`require_fp8_device`), so this drives the functions `llmhpc pretrain` calls, in
its order: `apply_float8` on the finished model, then `parallelize` (TP with SP; FSDP2 over the dp sub-mesh
in the 2-D layout), then AdamW steps as the Trainer takes them (its optimizer, bf16 autocast for fp8, the
float8 scale hook after each step).

What can be compared, and why not the losses of 4 AdamW steps to 1e-5 (measured, torch 2.13, torchao 0.18):

- On a CPU, torchao's Float8Linear calls `torch._scaled_mm`, which runs oneDNN's fp8 kernel only where
  cpuinfo reports AMX (aten/src/ATen/native/Blas.cpp); on the AVX2 and AVX-512 machines seen so far it
  emulates: the float8 operands are dequantized and multiplied by an fp32 MKL SGEMM (bitwise equal to
  `(a.float() * sa) @ (b.float() * sb)`). TP changes the order of fp32 sums (a row-parallel linear adds its
  partial products after the GEMM: 77% of the outputs of a 64x64x128 GEMM move by one ulp when K is split in
  two), and which ulp-level differences appear depends on the kernels MKL and ATen pick for the CPU.
- Float8 rounding is a step function: a value within an ulp of a rounding midpoint moves by a whole e4m3/e5m2
  step, and AdamW's first updates are about +-lr whatever a gradient's size, so a flipped sign of a small
  gradient element moves a weight by 2 lr. Nudging every initial weight of the one-process float8 model by one
  ulp (60 seeds) moved its 4-step losses by more than 1e-5 in 15 runs, up to 4.7e-4 (summing every float8
  GEMM in two parts, as row-parallel does: 13 of 60, up to 4.7e-4); the fp32 model moved by <= 4.8e-7. The
  same one-process float8 run with ATen's kernels for ATEN_CPU_CAPABILITY=default instead of AVX2 moved by
  5.9e-4, and tp=2 under that setting was 5.9e-4 off (1e-5 failed). CI saw 3.9e-4 on an EPYC with avx512_bf16
  and 9.5e-7 on a Xeon: one draw of that lottery each, not a bug of either CPU.
- The first step's gradients are taken before any update, so nothing amplifies a flipped element. TOL_GRAD
  bounds max over parameters of |g_TP - g_one| / |g_one| (whole tensors): ulp-level noise gave <= 7.6e-6
  (the 120 perturbed runs above; tp=2 on this machine's kernels 5.3e-7, with ATEN_CPU_CAPABILITY=default
  4.5e-7, with MKL_CBWR=COMPATIBLE 7.5e-6), while the bugs this test is for give ~1e-1: a per-shard amax in
  every cast 1.1e-1 (tp=2) / 1.0e-1 (dp_shard=2 x tp=2), a Float8Linear running in high precision 1.0e-1 (w2,
  row-parallel) / 9.5e-2 (wq, column-parallel), dp_shard=2 x tp=2 without the scale hook before step 1 (the
  float8 all-gather then casts with the amax of the TP shard) 1.1e-1; float8 vs fp32 is 1.1e-1. TOL_GRAD = 1e-3
  leaves about 100x on each side. The 4 AdamW steps still run, to check that the model learns.
- bf16 autocast (what the Trainer runs), both recipes: each rank rounds its row-parallel partial sums to bf16
  before the reduce-scatter (the rowwise float8 GEMM returns bf16 even for fp32 inputs), which moves many
  values into the next float8 bucket: the first gradients differ from one process's by 1.0e-1 (tensorwise) /
  4.0e-2 (rowwise), as much as float8 vs bf16 itself, and the losses by 1.0e-3 / 6.9e-4. TOL_BF16 = 5e-3 on the
  losses exceeds the float8-vs-bf16 gap (1.4e-3), so these scenarios check that the production path runs and
  trains, and the fp32 ones check the numbers.

One spawn per world size runs its scenarios and records numbers; the tests below only judge them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from tests.distributed.launch import spawn_gloo

pytest.importorskip("torchao.float8", reason="torchao is installed with the [dev] extra")

STEPS = 4
BATCH, SEQ = 2, 32
TOL_GRAD = 1e-3
"""fp32: max over parameters of |TP - one process| / |one process| for the first step's gradients (see above)."""
TOL_BF16 = 5e-3
MIN_FP8_GAP = 30 * TOL_GRAD
"""In fp32 the float8 model's first gradients must differ from the high-precision model's by far more than
TOL_GRAD, or matching the one-process float8 gradients would not show that the TP model computes in float8."""

MODEL = ModelConfig(name="fp8-tp-test", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                    max_seq_len=64, tie_embeddings=True)
"""Every block linear's full and per-rank shapes are multiples of 16 (what float8 GEMMs need)."""

# (scenario name, recipe, bf16 autocast, dp_shard); tp is always 2
SCENARIOS_TP2 = [
    ("tensorwise-fp32", "tensorwise", False, 1),
    ("tensorwise-bf16", "tensorwise", True, 1),
    ("rowwise-bf16", "rowwise", True, 1),
]
SCENARIOS_2D = [
    # FSDP2 x TP: tensorwise also all-gathers the weights in float8 and needs the scale hook after each step
    ("tensorwise-fp32-dp_shard2", "tensorwise", False, 2),
]


# ---- worker side (runs in the spawned ranks) ------------------------------------------------------


def _initial_model() -> torch.nn.Module:
    from llmhpc.models.llama import Llama

    torch.manual_seed(0)
    model = Llama(MODEL)
    model.init_weights()
    return model


def _batches() -> list[dict[str, torch.Tensor]]:
    """The same batches on every rank: TP splits one batch's work, and in the 2-D layout both dp ranks
    see the whole batch, so FSDP's gradient average equals the one-process gradient."""
    gen = torch.Generator().manual_seed(1234)
    ids = [torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]
    return [{"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()} for x in ids]


def _whole_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as one whole tensor (TP/FSDP shards gathered), by parameter name."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name] = grad.detach().float().clone()
    return grads


def _train(model: torch.nn.Module, bf16: bool,
           after_step: Callable[[], None] | None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """AdamW steps as the Trainer takes them (its optimizer, bf16 autocast for fp8, the scale hook): the
    losses, and the whole gradients of the first step (taken before any update)."""
    from llmhpc.config.schema import TrainerConfig
    from llmhpc.train.objective import causal_lm_loss
    from llmhpc.train.optim import build_optimizer

    optimizer, _ = build_optimizer(model, TrainerConfig(lr=3e-3))
    losses, first_grads = [], {}
    for batch in _batches():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss, n_tokens = causal_lm_loss(model, batch)
        (loss / n_tokens).backward()
        if not first_grads:
            first_grads = _whole_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step()
        full = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        losses.append(float(full.detach()) / n_tokens)
    return losses, first_grads


def _grad_distance(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over parameters of |got - ref| / |ref| (Frobenius norms), and the parameter where it is reached."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    dist = {name: float((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)) for name in ref}
    worst = max(dist, key=dist.__getitem__)
    return dist[worst], worst


def _scenario(world: int, recipe: str, bf16: bool, dp_shard: int) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor
    from torchao.float8.float8_linear import Float8Linear

    from llmhpc.config.schema import ParallelConfig
    from llmhpc.parallel import parallelize
    from llmhpc.parallel.dims import resolve_dims
    from llmhpc.parallel.float8 import apply_float8

    initial = _initial_model()
    high_losses, high_grads = _train(copy.deepcopy(initial), bf16, None)
    one_process = copy.deepcopy(initial)
    one_after = apply_float8(one_process, recipe, fsdp=False)
    one_losses, one_grads = _train(one_process, bf16, one_after)

    cfg = ParallelConfig(dp_shard=dp_shard, tp=2)
    dims = resolve_dims(cfg, world)
    model = copy.deepcopy(initial)
    after_step = apply_float8(model, recipe, fsdp=dims.fsdp, tp=dims.tp)  # pretrain's order: float8, then layout
    parallelize(model, dims, dims.build_mesh("cpu"), cfg)
    if after_step is not None:
        # As the Trainer does before its first step: FSDP's float8 all-gather casts each weight with the scale
        # the hook precomputed from the whole weight; without it torchao would reduce the amax over the FSDP
        # mesh only, which under TP is the amax of this rank's TP shard.
        after_step()
    float8 = [m for m in model.modules() if isinstance(m, Float8Linear)]
    losses, grads = _train(model, bf16, after_step)
    return {
        "losses": losses,
        "one_process": one_losses,
        "high_precision": high_losses,
        "grad_diff": _grad_distance(grads, one_grads),
        "grad_gap": _grad_distance(high_grads, one_grads),
        "float8_linears": len(float8),
        "sharded": sum(isinstance(m.weight, DTensor) for m in float8),
        "has_scale_hook": after_step is not None,
    }


def scenarios(table: list[tuple[str, str, bool, int]], world: int) -> dict[str, Callable[[], Any]]:
    return {name: lambda r=recipe, b=bf16, d=dp: _scenario(world, r, b, d) for name, recipe, bf16, dp in table}


# ---- test side --------------------------------------------------------------------------------------


def _run(world: int, table: list[tuple[str, str, bool, int]], out) -> dict[str, list[dict[str, Any]]]:
    """{scenario name: one result dict per rank} from one `world`-process run of `table`."""
    per_rank = spawn_gloo(world, partial(scenarios, table), out)
    return {name: [r[name] for r in per_rank] for name, *_ in table}


@pytest.fixture(scope="module")
def results_tp2(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Every tp=2 scenario's numbers, one dict per rank, from one 2-process run."""
    return _run(2, SCENARIOS_TP2, tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def results_2d(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """The dp_shard=2 x tp=2 scenarios' numbers from one 4-process run (4 processes on 2 cores: slow)."""
    return _run(4, SCENARIOS_2D, tmp_path_factory.mktemp("dp2tp2"))


def _check(per_rank: list[dict[str, Any]], name: str, recipe: str, bf16: bool, dp_shard: int) -> None:
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank} failed in {name}:\n{res['error']}"
        assert res["float8_linears"] == res["sharded"] == MODEL.n_layers * 7, res  # every block linear, sharded
        assert res["has_scale_hook"] == (dp_shard > 1 and recipe == "tensorwise"), res
        got, expected, high = res["losses"], res["one_process"], res["high_precision"]
        assert len(got) == STEPS and all(math.isfinite(x) for x in got), got
        loss_diff = max(abs(a - b) for a, b in zip(got, expected, strict=True))
        loss_gap = max(abs(a - b) for a, b in zip(high, expected, strict=True))
        (grad_diff, where), (grad_gap, gap_where) = res["grad_diff"], res["grad_gap"]
        print(f"{name} rank {rank}: step-1 gradients |TP - one process| {grad_diff:.2e} ({where}), float8 vs high "
              f"precision {grad_gap:.2e} ({gap_where}); losses of {STEPS} AdamW steps |TP - one process| "
              f"{loss_diff:.2e}, float8 vs high precision {loss_gap:.2e}")
        if bf16:
            assert loss_diff < TOL_BF16, (loss_diff, got, expected)
        else:
            assert grad_diff < TOL_GRAD, (
                f"the TP model's first gradient of {where} is {grad_diff:.2e} (relative) away from the one-process "
                f"float8 model's: more than reduction order explains (<= 7.6e-6 measured); a per-shard scale or a "
                f"linear left in high precision gives ~1e-1"
            )
            # matching the one-process float8 gradients means something only if float8 moves them far beyond it
            assert grad_gap > MIN_FP8_GAP, f"float8 changes the gradients by only {grad_gap:.2e}: still converted?"
        assert got[-1] < got[0], f"the model must learn: {got}"


@pytest.mark.parametrize(("name", "recipe", "bf16", "dp_shard"), SCENARIOS_TP2, ids=[s[0] for s in SCENARIOS_TP2])
def test_float8_tp_matches_one_process(results_tp2, name: str, recipe: str, bf16: bool, dp_shard: int) -> None:
    _check(results_tp2[name], name, recipe, bf16, dp_shard)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "recipe", "bf16", "dp_shard"), SCENARIOS_2D, ids=[s[0] for s in SCENARIOS_2D])
def test_float8_fsdp_tp_matches_one_process(results_2d, name: str, recipe: str, bf16: bool, dp_shard: int) -> None:
    _check(results_2d[name], name, recipe, bf16, dp_shard)
