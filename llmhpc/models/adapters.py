"""Adapter weights as plain tensors: their names, and folding them into the weights they adapt.

`llmhpc.peft` adds LoRA / DoRA adapters to a model and trains them; a checkpoint of such a run holds the
adapters next to a frozen base it references. Everything that reads weights without training them (loading a
run, exporting it) only needs to recognize the adapter tensors and fold each into its base weight, which is
tensor arithmetic: it lives here, below `llmhpc.peft`, so the loaders need no training code. So does the NF4
rounding of a QLoRA base: a QLoRA run's adapters were trained against the NF4 values of the base, so a reader
folds them into those values, not into the original weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ADAPTER_PARAMETERS = ("lora_A", "lora_B", "lora_magnitude")
"""Parameter names (last part) of the adapters `llmhpc.peft` adds: no weight source holds them; whoever added
them initializes them after the base is loaded."""


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name of our model is an adapter's (lora_A / lora_B / lora_magnitude)."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMETERS


def adapter_names(model: nn.Module) -> set[str]:
    """The model's adapter parameters (see ADAPTER_PARAMETERS)."""
    return {name for name, _ in model.named_parameters() if is_adapter_parameter(name)}


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """Factor on B A x: alpha / rank, or alpha / sqrt(rank) with rsLoRA (peft's formula)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@torch.no_grad()
def fold_adapter(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """W + s B A, or for DoRA m / ||W + s B A|| * (W + s B A) per output row (peft's merge), in W's dtype.

    A pure function of tensors, so a converter that streams one weight at a time can fold adapters without
    building the model. Computed in fp32 whatever the dtype, so merging a bf16 base rounds once, at the end.
    """
    merged = weight.float() + (lora_B.float() @ lora_A.float()) * scaling
    if magnitude is not None:
        merged = (magnitude.float() / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
    return merged.to(weight.dtype)


NF4_BLOCK = 64
"""NF4 block: 64 weights share one absmax scale (QLoRA's choice)."""
NF4_SCALER_BLOCK = 256
"""Double quantization: the absmax scales are themselves quantized to 8 bits in blocks of 256 (QLoRA's choice),
or a smaller power of two where that does not split a weight into NF4_SHARDS equal runs of blocks."""
NF4_SHARDS = 8
"""FSDP2 splits an NF4 weight into dp_shard runs of whole blocks (scales and their 8-bit scales alike): the
scaler block is chosen so that any dp_shard dividing 8 can, whatever the run's layout, and a weight is
quantized the same way on one process and on eight (SmolLM2's k / v: 1728 scales, blocks of 8)."""


def _scaler_block(numel: int) -> int | None:
    if numel % NF4_BLOCK:
        return None
    scalers, block = numel // NF4_BLOCK, NF4_SCALER_BLOCK
    while block >= 2 and scalers % (block * NF4_SHARDS):
        block //= 2
    return block if block >= 2 else None


def to_nf4(weight: torch.Tensor):
    """`weight` as torchao's NF4Tensor (4-bit NormalFloat, double-quantized scales), or None when it does not
    split into NF4_SHARDS equal runs of 64-weight blocks (such a weight stays in full precision)."""
    block = _scaler_block(weight.numel())
    if block is None:
        return None
    from llmhpc.metrics.import_noise import quiet_import_noise

    quiet_import_noise()  # torchao's import-time notices about CUDA-only kernels are not the user's business
    from torchao.quantization import to_nf4 as torchao_to_nf4

    return torchao_to_nf4(weight.detach(), NF4_BLOCK, block)


def is_nf4(weight: torch.Tensor) -> bool:
    """Whether `weight` is a torchao NF4Tensor (what `to_nf4` returns)."""
    return hasattr(weight, "quantized_data") and hasattr(weight, "quantized_scalers")


def is_sharded_nf4(weight: torch.Tensor) -> bool:
    """Whether `weight` is a tensor-parallel DTensor whose local shard is an NF4Tensor (a QLoRA base under TP)."""
    return hasattr(weight, "device_mesh") and is_nf4(weight.to_local())


def dequantize_nf4(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain tensor an NF4Tensor stands for: torchao's `get_original_weight`, bit for bit, in one table
    look-up per stored byte (its two 4-bit codes) and one multiply by the block scales, about 6x faster on CPU
    than torchao's unpacking. In `dtype` (default: the tensor's own) with the scales applied in that dtype."""
    dtype = dtype or weight.dtype
    levels = weight.nf4.to(dtype)  # byte b -> (level[b >> 4], level[b & 15]): the first code is the high nibble
    pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)
    scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
    values = pairs[weight.quantized_data.long()].view(-1, weight.block_size)
    return (values * scales.to(dtype)[:, None]).view(weight.shape)


def nf4_values(weight: torch.Tensor, shards: int = 1, dim: int = 0) -> torch.Tensor:
    """What `weight` computes with as a QLoRA base: its NF4 values in weight's dtype (itself where NF4 does not
    apply, see `to_nf4`). With `shards` > 1, each of that many equal pieces along `dim` is quantized on its own,
    as the ranks of a tensor-parallel run quantize their own shards."""
    if shards > 1:
        return torch.cat([nf4_values(part.contiguous()) for part in weight.chunk(shards, dim)], dim)
    quantized = to_nf4(weight)
    return weight if quantized is None else dequantize_nf4(quantized).to(weight.dtype)


ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
"""The projections tensor parallel splits on their input features (a weight's second dimension: row-wise
parallel); it splits every other projection on its output rows."""


def trained_base(module: str, weight: torch.Tensor, qlora: bool, tp: int) -> torch.Tensor:
    """The base values a run's adapters on `module` were trained against: `weight` itself, or under peft=qlora
    its NF4 values, each of the run's `tp` tensor-parallel shards quantized on its own as its rank did."""
    if not qlora:
        return weight
    return nf4_values(weight, shards=tp, dim=1 if module.endswith(ROW_PARALLEL) else 0)
