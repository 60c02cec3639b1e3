"""FP8 training (`precision=fp8`) with torchao's float8 linears.

Every transformer-block linear becomes a `torchao.float8.Float8Linear`: its matmuls run in float8 (e4m3
forward, e5m2 gradients) with dynamic scales, `tensorwise` (one scale per tensor, the fastest) or
`rowwise` (one per row, more accurate). Master weights, optimizer state, norms, attention, the embedding
and the output head stay in higher precision (the head stays out because the loss is most sensitive to
it; the rest runs under bf16 autocast as with `precision=bf16`).

Under FSDP2 the `tensorwise` recipe also all-gathers the weights in float8 (half the bytes of bf16); their
scales are then computed for all blocks at once after each optimizer step (`after_optimizer_step`).

Under tensor parallel (`parallel.tp > 1`) the float8 linears are sharded by the ordinary TP/SP plans of
`llmhpc.parallel.tensor`: activations are all-gathered and reduce-scattered in high precision and each rank
runs float8 GEMMs on its shards. The scales stay those of the whole tensors because torchao computes the
amax on the DTensor, which reduces it over the shards; tests/distributed/test_fp8_tp.py checks that tp=2
reproduces one process's float8 first-step gradients in fp32 (within 1e-3 relative: reduction order leaves
< 1e-5, a per-shard scale ~1e-1; later losses are not comparable that tightly, because float8 rounding and
AdamW amplify one-ulp differences, which depend on the CPU's kernels). torchao's float8 TP plans
(`Float8ColwiseParallel`, `Float8RowwiseParallel`, `PrepareFloat8ModuleInput`: all-gathers in float8, which
torchtitan uses on GPU for `tensorwise`) are not used: their all-gather sends the float8 data tensor
through `_c10d_functional.all_gather_into_tensor`, and gloo rejects every float8 dtype
(`RuntimeError: Invalid scalar type`, also for plain `all_gather` and `broadcast`), so they cannot be
tested on CPU. They only cover `tensorwise` in any case.

FP8 matmuls need tensor cores that have them (NVIDIA compute capability >= 8.9: H100, H200, L40S, B200).
Anywhere else `require_fp8_device` stops the run at launch; torchao would otherwise emulate float8
slowly on CPU, which no one wants as a training run, and falling back to bf16 silently would be worse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from llmhpc.config.validate import ConfigError
from llmhpc.metrics.import_noise import quiet_import_noise

FP8_RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)


def require_fp8_device(device: torch.device) -> None:
    """Raise a one-line `ConfigError` unless `device` can run FP8 matmuls and torchao is installed."""
    fix = "use precision=bf16 on this machine"
    if device.type != "cuda":
        raise ConfigError(
            f"precision=fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability >= 8.9: H100, H200, "
            f"L40S, B200); this run's device is {device.type}; {fix}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"precision=fp8 needs compute capability >= 8.9 (H100, H200, L40S, B200); {name} has "
            f"{capability[0]}.{capability[1]}; {fix}"
        )
    try:
        quiet_import_noise()
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError("precision=fp8 needs torchao: pip install 'llmhpc[gpu]'") from None


def _convertible(tp: int) -> Callable[[nn.Module, str], bool]:
    """Block linears whose per-rank shapes the float8 GEMM accepts (multiples of 16); never the head.

    TP splits one dimension of every block linear by `tp` (column-wise the output, row-wise the input); checking
    both dimensions divided by `tp` covers either split.
    """

    def accept(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
            return False
        return all(n % tp == 0 and (n // tp) % 16 == 0 for n in (module.in_features, module.out_features))

    return accept


def apply_float8(model: nn.Module, recipe: str, *, fsdp: bool, tp: int = 1) -> Callable[[], None] | None:
    """Swap the block linears of `model` for float8 ones in place (before TP/FSDP are applied).

    `tp` is the tensor-parallel degree the model will be split over: a linear whose shard would not suit the
    float8 GEMM stays in high precision. Returns the function to call once before the first step and after
    every optimizer step (FSDP2 float8 all-gather needs the coming step's weight scales, from the whole weight
    across FSDP and TP shards), or None when nothing is needed.
    """
    quiet_import_noise()  # torchao's import-time notices about kernels and enums are not the user's business
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in FP8_RECIPES:
        raise ConfigError(f"precision.fp8_recipe={recipe!r} is not one of: {', '.join(FP8_RECIPES)}")
    fp8_all_gather = fsdp and recipe == "tensorwise"
    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(recipe), enable_fsdp_float8_all_gather=fp8_all_gather
    )
    convert_to_float8_training(model, config=config, module_filter_fn=_convertible(tp))
    if not fp8_all_gather:
        return None
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    return lambda: precompute_float8_dynamic_scale_for_fsdp(model)
