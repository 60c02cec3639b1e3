"""Decode-time weight packing: during a rollout, the linear layers multiply by weights laid out once for MKL.

Why: a decode step multiplies a few rows (one token per request) by every weight matrix of the model. For each
call, MKL's ordinary sgemm first copies the whole weight into its blocked layout, and at 8 rows that copy costs more
than the multiply itself. The weights do not change during a rollout, so the rollout lays each one out once
(`mkl::_mkl_reorder_linear_weight`, the packed GEMM `torch.compile` uses for frozen fp32 weights) and multiplies with
`mkl::_mkl_linear`: the same product (summed in another order: logits differ by ~1e-5), at 8 rows 1.5-2.7x faster
per matrix of SmolLM2's shapes (docs/rollout.md).

What is packed: the weight of every plain `nn.Linear` and the output head, when it is an fp32 (or bf16: below) CPU
tensor (not an FSDP2 shard; those are gathered before decoding), in no-grad mode, within `budget_bytes` of packed
buffers (an fp32 pack is about four times its weight: PyTorch allocates MKL's byte count as floats). Everything
else (LoRA layers, NF4 weights, fp16, other devices) runs as before. An fp32 pack is used only for the row count it
was packed for (MKL's packed GEMM is laid out for one M); other shapes, like the prefills, fall back to the plain
product inside the same call.

Under bf16 autocast (`precision=bf16|fp8` runs sample inside the training autocast) the same weights are instead
cast to bf16 once per rollout, not on every product as autocast does, so each decode step reads half the weight
bytes of fp32 (a step is bound by reading every weight once); weights that are bf16 already (a model cast to bf16)
take the same path. Where oneDNN computes bf16 products (AVX-512 and newer) the bf16 copy is also laid out once
for oneDNN's inner product (`mkldnn::_reorder_linear_weight`, multiplied with `mkldnn::_linear_pointwise`): the
plain bf16 product lays the weight out again on every call (SmolLM2's 211 products of a decode step at 8 rows, an
Intel Xeon with AMX, 2 cores: 50 ms plain, 31 ms packed; tools/bench_decode_products.py, docs/rollout.md). The
packed bf16 product is autocast's (bf16 inputs, bf16 result), equal to it bit for bit where both run the same
oneDNN kernel (as measured there; the tests check it to bf16 rounding), so the sampler's log-probs are those the
bf16 training forward computes; unlike MKL's fp32 packs, one layout serves every row count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

DEFAULT_BUDGET_BYTES = 4 << 30
"""Packed buffers held at most (4 GiB: every weight of a ~250M-parameter fp32 model)."""


def packing_available() -> bool:
    """Whether this torch build has MKL's packed GEMM."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


@functools.cache
def bf16_packing_available() -> bool:
    """Whether oneDNN computes bf16 products on this CPU (AVX-512 or newer, where the plain bf16 product goes
    through oneDNN as well, laying the weight out again at every call); elsewhere bf16 runs plain. A fact of the
    machine, asked on every product of a bf16 model: looked up once."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packable(weight: torch.Tensor) -> bool:
    return (type(weight) in (torch.Tensor, nn.Parameter) and not isinstance(weight, DTensor)
            and weight.dtype in (torch.float32, torch.bfloat16) and weight.device.type == "cpu"
            and weight.dim() == 2)


def _bf16_copy(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` in bf16, laid out for oneDNN's inner product at `rows` rows where that pays (see the docstring)."""
    copy = weight.to(torch.bfloat16)
    return torch.ops.mkldnn._reorder_linear_weight(copy, rows) if bf16_packing_available() else copy


def _bf16_linear(x: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    if copy.layout == torch._mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), copy, None, "none", [], "")
    return F.linear(x.to(torch.bfloat16), copy)


class PackedWeights:
    """Packed copies of weights for products of `rows` rows, made on first use and kept until `rows` changes."""

    def __init__(self, rows: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._rows = rows
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._refused: set[int] = set()
        self._cast: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """bf16 copies made under autocast (any row count may use them: kept when `rows` changes)."""
        self.held_bytes = 0
        self.peak_bytes = 0
        """The most packed-buffer bytes held at once."""

    @property
    def rows(self) -> int:
        return self._rows

    @rows.setter
    def rows(self, rows: int) -> None:
        """A new row count: the packs made for the old one are useless to MKL, drop them."""
        if rows != self._rows:
            self._rows, self._packed, self._refused = rows, {}, set()
            self.held_bytes = sum(copy.numel() * copy.element_size() for _, copy in self._cast.values())

    def _derived(self, store: dict[int, tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor, size: int,
                 make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """store's copy of `weight` (a pack or a bf16 cast), made by `make` on first use, or None where the weight
        cannot have one or `size` (the most bytes the copy takes) would pass the budget (remembered until `rows`
        changes)."""
        key = id(weight)
        entry = store.get(key)
        if entry is not None and entry[0] is weight:
            return entry[1]
        if key in self._refused or not _packable(weight):
            return None
        if self.held_bytes + size > self.budget_bytes:
            self._refused.add(key)
            return None
        made = make(weight.detach())
        store[key] = (weight, made)
        self.held_bytes += made.numel() * made.element_size()
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        return made

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.linear(x, weight), through the packed weight when there is one (x [..., K], weight [N, K])."""
        if torch.is_grad_enabled():
            return F.linear(x, weight)
        autocast = torch.is_autocast_enabled("cpu") and x.device.type == "cpu"
        bf16_autocast = autocast and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if (bf16_autocast and weight.dtype == torch.float32) or (
                x.dtype == weight.dtype == torch.bfloat16 and bf16_packing_available()):
            copy = self._derived(self._cast, weight, 2 * weight.numel(), lambda w: _bf16_copy(w, self._rows))
            return F.linear(x, weight) if copy is None else _bf16_linear(x, copy)
        if autocast or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return F.linear(x, weight)
        size = 4 * weight.numel() * weight.element_size()  # see the module docstring
        packed = self._derived(self._packed, weight, size,
                               lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, self._rows))
        if packed is None:
            return F.linear(x, weight)
        return torch.ops.mkl._mkl_linear(x, packed, weight, None, self._rows)


@contextmanager
def packed_linears(model: nn.Module, packer: PackedWeights) -> Iterator[PackedWeights]:
    """Within the block, every bias-free plain `nn.Linear` of `model` multiplies through `packer` (its forward is
    replaced on the instance, so module hooks still run, and restored on exit)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.bias is None]
    try:
        for module in linears:
            module.forward = lambda x, module=module: packer.linear(x, module.weight)
        yield packer
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)
