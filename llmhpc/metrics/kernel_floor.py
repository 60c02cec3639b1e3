"""The shortest train step a Llama's own kernels allow: its matmuls, attention and AdamW update, run alone.

`llmhpc bench` races our trainer against transformers; this says how far any trainer could get on the
machine at hand. Every train step of the same model on the same batch does the same matmuls (6 N FLOPs per
token), the same causal attention (all the trainers raced call PyTorch's SDPA; the alternatives measured were
slower, docs/benchmarks.md) and the same fused AdamW update. Those kernels, timed alone at the step's shapes
with preallocated (already touched) outputs and nothing in between, bound every trainer's step time from
below, and a reference's step time over this floor is the largest speedup over it those kernels permit.

The floor is optimistic on purpose, so that a ceiling computed from it is a true upper bound: activations are
shared between layers (they stay warm in cache), weights are in the compute dtype already (no autocast casts),
and norms, RoPE, SwiGLU, residual adds, the softmax of the loss and the embedding's backward cost nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmhpc.models.llama import Llama, head_dim_of


@dataclass(frozen=True)
class FloorTimes:
    """Seconds one step's kernels took when run alone."""

    matmul_s: float
    """Every linear's forward, input-gradient and weight-gradient matmul, and the LM head's three."""
    attention_s: float
    """SDPA forward + backward of every layer (causal, grouped-query)."""
    optimizer_s: float
    """One fused AdamW step over tensors the sizes of the model's parameters."""

    @property
    def total_s(self) -> float:
        return self.matmul_s + self.attention_s + self.optimizer_s


class KernelFloor:
    """The kernels of one train step of `model` on a [batch, seq] batch, in `dtype`, ready to time.

    Holds the weights in the compute dtype (the model's own tensors in fp32) and fp32 parameters, gradients and
    AdamW moments the size of the model: about four times the model's fp32 size on top of it.
    """

    def __init__(self, model: Llama, batch: int, seq: int, dtype: torch.dtype) -> None:
        cfg = model.cfg
        tokens = batch * seq
        linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
        self._weights = [m.weight.detach().to(dtype) for m in linears] + [model.lm_head_weight().detach().to(dtype)]
        by_shape = {tuple(w.shape) for w in self._weights}

        def buffer(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, dtype=dtype)

        # Per weight shape [out, in]: the layer input [tokens, in] and output gradient [tokens, out], and
        # outputs for y = x W^T [tokens, out], dx = dy W [tokens, in], dW = dy^T x [out, in].
        self._io = {(o, i): (buffer(tokens, i), buffer(tokens, o), buffer(tokens, o), buffer(tokens, i), buffer(o, i))
                    for o, i in by_shape}
        hd = head_dim_of(cfg)
        self._q = buffer(batch, cfg.n_heads, seq, hd).requires_grad_()
        self._kv = [buffer(batch, cfg.n_kv_heads, seq, hd).requires_grad_() for _ in range(2)]
        self._attn_grad = buffer(batch, cfg.n_heads, seq, hd)
        self._n_layers = cfg.n_layers
        params = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        self._optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def _matmuls(self) -> None:
        for w in self._weights:  # forward, in model order
            x, _, y, _, _ = self._io[tuple(w.shape)]
            torch.mm(x, w.t(), out=y)
        for w in reversed(self._weights):  # backward: input and weight gradients
            x, dy, _, dx, dw = self._io[tuple(w.shape)]
            torch.mm(dy, w, out=dx)
            torch.mm(dy.t(), x, out=dw)

    def _attention(self) -> None:
        k, v = self._kv
        gqa = self._q.shape[1] != k.shape[1]
        for _ in range(self._n_layers):
            out = F.scaled_dot_product_attention(self._q, k, v, is_causal=True, enable_gqa=gqa)
            torch.autograd.grad(out, (self._q, k, v), self._attn_grad)

    def measure(self) -> FloorTimes:
        """Time each group of kernels once (call once untimed first: the first calls pick kernels)."""
        times = []
        for run in (self._matmuls, self._attention, self._optimizer.step):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return FloorTimes(*times)
