"""Log-probabilities of given tokens under an LM head, chunk by chunk, with gradient.

DPO, PPO and GRPO need log p(target | context) per token for the tokens a policy chose or sampled, and
its gradient. The plain way, `log_softmax(hidden @ W.T).gather(targets)`, materializes fp32 logits
[batch, seq, vocab] plus a log-softmax and gradients of the same size: 2.3 GiB above the inputs for
8 x 512 tokens on the SmolLM2 head (vocab 49152).

`token_logprobs(hidden, head, targets)` works on `chunk_tokens` rows at a time and keeps no logits
for backward: each chunk runs inside a non-reentrant `torch.utils.checkpoint`, so backward
recomputes that chunk's logits (one extra GEMM: 4 instead of 3) and frees them before the next chunk.
Only one chunk's logits (and its gradient) are alive at any moment. Because the head is an opaque
callable, this works for anything autograd can differentiate: `model.logits`, a LoRA-wrapped head,
and the vocabulary-sharded DTensor logits of loss parallel, whose log-softmax and gather go through
`F.cross_entropy(..., reduction="none")` (the op DTensor's loss parallel implements with two small
all-reduces, never gathering the vocabulary).

For plain logits the log-softmax + gather is one custom autograd function (`_GatherLogSoftmax`): it
saves the logits and each row's log-sum-exp and writes the gradient g * (one_hot - softmax) in row
blocks, instead of `F.cross_entropy`'s log-softmax output, zero-filled one-hot scatter and separate
log-softmax backward. Same speed, but one chunk-sized buffer fewer: through `F.cross_entropy` the
chunked path's peak memory was 0.34x the full path's (at the 0.35x goal), with this function 0.23x.

`linear_token_logprobs(hidden, weight, targets)` is the same for a plain head matrix, as one custom
autograd function that also owns the GEMMs: it writes every chunk's logits, and then their gradient,
into one buffer kept between calls on CPU (see `llmhpc.train.losses`: a fresh chunk-sized tensor costs
a page fault per 4 KiB, about as long as a pass over it), saves only a log-sum-exp per token, and
skips the weight-gradient GEMM for a frozen head. Measured on the SmolLM2 head, 8 x 512 tokens, fp32
(docs/benchmarks.md, tools/bench_logprobs_memory.py): against the full-logits path, `token_logprobs`
takes 1.39x the time (4 GEMMs instead of 3 put its floor at 1.33x) and 0.23x the peak memory,
`linear_token_logprobs` 1.12x the time and 0.14x the memory, so 0.81x the generic path's time. Both
are kept: the generic path is the only one that works through an arbitrary head (DTensor, adapters),
and the plain one serves the common single-process case at that clear saving.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmhpc.train.losses import IGNORE_INDEX

CHUNK_TOKENS = 1024
"""Default tokens per chunk: one chunk of fp32 logits is 1024 x 49152 x 4 bytes = 192 MiB on SmolLM2."""

_ROW_BLOCK = 256
"""Rows per pointwise block inside a chunk: the fp32 temporaries of a block (48 MiB at vocab 49152)
stay far below a chunk's logits, so the log-sum-exp and the gradient allocate no chunk-sized buffer."""


def token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    *,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """log_softmax(head(hidden)) at `targets`, in fp32, of shape `targets.shape`, with gradient.

    hidden [..., dim]; targets [...] (hidden.shape[:-1]), int64 token ids; `head` maps a chunk of
    hidden states [n, dim] to logits [n, vocab], either a plain tensor or, under tensor parallel with
    loss parallel, a vocabulary-sharded DTensor (Shard(-1)): then both this call and the backward
    must run inside `torch.distributed.tensor.parallel.loss_parallel()`.

    Positions whose target is IGNORE_INDEX give 0 and no gradient. Gradients reach `hidden` and
    whatever the head differentiates (its parameters). Under autocast the head's matmul runs in the
    autocast dtype and the log-softmax in fp32. Without grad mode (reference models) the chunks run
    without checkpointing. Each backward recomputes each chunk's logits once (`retain_graph=True`
    works: a second backward recomputes them again). No double backward.
    """
    flat_h, flat_t = _flatten(hidden, targets, chunk_tokens)
    rows = flat_h.shape[0]
    if rows == 0:
        return torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    pieces = []
    for start in range(0, rows, chunk_tokens):
        h_c, t_c = flat_h[start : start + chunk_tokens], flat_t[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, head, h_c, t_c, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, h_c, t_c))
    return torch.cat(pieces).view(targets.shape)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """`token_logprobs(hidden, lambda h: F.linear(h, weight), targets)` for a plain [vocab, dim] weight.

    Same values, gradients and autocast behaviour (matmuls in the autocast dtype, softmax in fp32),
    faster and leaner: see the module docstring. `weight` must be a plain tensor (for a DTensor head
    use `token_logprobs`). Its gradient is accumulated in fp32 and handed back in the weight's dtype.
    On CPU one chunk-sized logits buffer per dtype (192 MiB for 1024 fp32 rows of SmolLM2) stays
    allocated between calls.
    """
    if type(weight.data) is not torch.Tensor:
        raise TypeError(f"linear_token_logprobs needs a plain weight tensor, got {type(weight).__name__}; "
                        "use token_logprobs with the head as a callable")
    flat_h, flat_t = _flatten(hidden, targets, chunk_tokens)
    dtype = _compute_dtype(weight)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and flat_h.requires_grad, grad_on and weight.requires_grad
    with torch.autocast(flat_h.device.type, enabled=False):
        out = _LinearTokenLogprobs.apply(flat_h, weight, flat_t, chunk_tokens, dtype, need_h, need_w)
    return out.view(targets.shape)


# ---- the generic path: checkpointed chunks through any head ---------------------------------------


def _flatten(hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must have the shape of hidden {tuple(hidden.shape)} "
                         "without its last (model) dimension")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _chunk_logprobs(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Log-probs [n] (fp32) of one chunk: plain logits through `_GatherLogSoftmax`, DTensor through CE."""
    logits = head(h)
    if type(logits) is torch.Tensor:
        return _GatherLogSoftmax.apply(logits, t)
    # A DTensor (loss parallel): F.cross_entropy is the op it decomposes into a vocabulary-parallel
    # log-softmax and gather; its per-token output is replicated, so the local tensor holds every value.
    out = -F.cross_entropy(logits.float(), t, reduction="none", ignore_index=IGNORE_INDEX)
    return out.to_local() if hasattr(out, "to_local") else out


def _row_blocks(rows: int):
    return (slice(s, s + _ROW_BLOCK) for s in range(0, rows, _ROW_BLOCK))


def _logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """Per-row log-sum-exp in fp32, one row block at a time (no chunk-sized temporary)."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for b in _row_blocks(logits.shape[0]):
        torch.logsumexp(logits[b].float(), dim=-1, out=out[b])
    return out


def _dlogits(
    logits: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor, g: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out (fp32, may be `logits` itself) <- g * (one_hot(safe) - softmax(logits)) for one row block.

    d log p(safe) / d logits = one_hot(safe) - softmax; the softmax comes from the saved log-sum-exp.
    """
    torch.sub(logits, lse.unsqueeze(1), out=out)
    out.exp_().mul_(-g.unsqueeze(1))
    return out.scatter_add_(1, safe.unsqueeze(1), g.unsqueeze(1))


def _dlogits_blocks_(logits: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor, g: torch.Tensor,
                     grad: torch.Tensor) -> torch.Tensor:
    """grad [n, vocab] <- the log-prob gradient of every row of logits, in fp32 row blocks.

    `grad` may be `logits` itself (the plain-weight path overwrites its buffer). A fp32 `grad` is
    written directly; a lower-precision one through one block-sized fp32 temporary.
    """
    tmp = None
    for b in _row_blocks(logits.shape[0]):
        if grad.dtype == torch.float32:
            _dlogits(logits[b], lse[b], safe[b], g[b], out=grad[b])
        else:
            if tmp is None:
                tmp = torch.empty(min(_ROW_BLOCK, logits.shape[0]), logits.shape[1], dtype=torch.float32,
                                  device=logits.device)
            rows = grad[b].shape[0]
            grad[b] = _dlogits(logits[b], lse[b], safe[b], g[b], out=tmp[:rows])
    return grad


def _targets(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = t != IGNORE_INDEX
    return torch.where(keep, t, 0), keep


class _GatherLogSoftmax(torch.autograd.Function):
    """log_softmax(logits.float()) gathered at the targets (0 where ignored); logits [n, vocab] plain."""

    @staticmethod
    def forward(ctx, logits, targets):  # type: ignore[override]
        safe, keep = _targets(targets)
        lse = _logsumexp_rows(logits)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, lse, safe, keep)
        return torch.where(keep, picked - lse, 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        logits, lse, safe, keep = ctx.saved_tensors
        g = torch.where(keep, grad_out.float(), 0.0)
        return _dlogits_blocks_(logits, lse, safe, g, torch.empty_like(logits)), None


# ---- the plain-weight path: one function owning the GEMMs ------------------------------------------


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for the head (its lower-precision dtype, or the weight's)."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


_cpu_buffers: dict[torch.dtype, torch.Tensor] = {}


def _chunk_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, vocab] buffer for one chunk's logits (then their gradient), kept between calls on CPU.

    On CPU a fresh chunk-sized tensor comes straight from mmap and goes back on free, so every chunk
    would fault its pages in again; one buffer (the largest asked for, per dtype) is kept instead. On
    other devices the caching allocator already reuses memory.
    """
    if device.type != "cpu":
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    buf = _cpu_buffers.get(dtype)
    if buf is None or buf.shape[1] != vocab or buf.shape[0] < rows:
        _cpu_buffers.pop(dtype, None)  # free the old one before allocating its successor
        buf = _cpu_buffers[dtype] = torch.empty(rows, vocab, dtype=dtype)
    return buf[:rows]


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    return torch.mm(h, w.t(), out=buf[: h.shape[0]])


class _LinearTokenLogprobs(torch.autograd.Function):
    """Log-probs of hidden @ weight.T at the targets; saves one log-sum-exp per token, recomputes logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype, need_h, need_w):  # type: ignore[override]
        safe, keep = _targets(targets)
        rows = hidden.shape[0]
        out = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        if rows:
            h, w = hidden.to(dtype), weight.to(dtype)
            buf = _chunk_buffer(min(chunk, rows), w.shape[0], dtype, h.device)
            for s in range(0, rows, chunk):
                d = _chunk_logits(h[s : s + chunk], w, buf)
                lse[s : s + chunk] = _logsumexp_rows(d)
                out[s : s + chunk] = d.gather(1, safe[s : s + chunk].unsqueeze(1)).squeeze(1).float()
            out = torch.where(keep, out - lse, 0.0)
        if need_h or need_w:
            ctx.save_for_backward(hidden, weight, safe, keep, lse)
        ctx.setup = (chunk, dtype, need_h, need_w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, safe, keep, lse = ctx.saved_tensors
        chunk, dtype, need_h, need_w = ctx.setup
        g = torch.where(keep, grad_out.float(), 0.0)
        h, w = hidden.to(dtype), weight.to(dtype)
        rows = h.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        buf = _chunk_buffer(min(chunk, rows), w.shape[0], dtype, h.device) if rows else None
        for s in range(0, rows, chunk):
            h_c = h[s : s + chunk]
            rb = slice(s, s + h_c.shape[0])
            d = _chunk_logits(h_c, w, buf)
            _dlogits_blocks_(d, lse[rb], safe[rb], g[rb], grad=d)
            if grad_h is not None:
                if grad_h.dtype == dtype:
                    torch.mm(d, w, out=grad_h[s : s + chunk])
                else:
                    grad_h[s : s + chunk] = d @ w
            if grad_w is not None:
                if dtype == torch.float32:
                    grad_w.addmm_(d.t(), h_c)
                else:
                    grad_w += (d.t() @ h_c).float()
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None
