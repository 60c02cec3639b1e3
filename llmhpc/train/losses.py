"""Loss functions over model outputs.

Losses return a *sum* and the number of tokens it covers, so that gradient accumulation can
normalize by the token count of the whole global batch (exactly the loss of one big batch).

The language-modelling loss fuses the LM head with the cross entropy (`linear_cross_entropy_sum`):
with a 49k-token vocabulary the fp32 logits of a 4 x 256 batch are 200 MB, and the unfused path
makes many memory-bound passes over them (upcast, log-softmax, its backward, the one-hot scatter).
Working on chunks of tokens, computing both gradients during the forward with one compiled
softmax-minus-one-hot kernel, keeps one chunk of logits alive at a time and nothing for backward.
Measured on the SmolLM2 head (docs/benchmarks.md): 25 % faster under bf16 autocast, even in fp32,
where the three GEMMs dominate.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label value excluded from the loss (prompt tokens in SFT, padding)."""

CHUNK_TOKENS = 1024
"""Tokens per chunk of the fused LM-head loss: big enough for efficient GEMMs, small enough that one
chunk's fp32 logits (chunk x vocab x 4 bytes: 200 MB at 1024 x 49152) are the only ones alive."""


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy in fp32 and the number of labelled tokens."""
    flat = logits.reshape(-1, logits.size(-1)).float()
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for the head (its lower-precision dtype, or the weight's)."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_loss_and_dlogits_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE of one chunk of logits (in fp32); overwrites the logits with d(loss sum)/d(logits).

    d/d(logits) = softmax - one_hot(target), zero on ignored rows. Compiled, this is two passes
    over the chunk (a max + sum-of-exp reduction, then one pointwise pass that writes the gradient
    over the logits it read) instead of the ~8 full passes and fp32 temporaries of the eager ops.
    Writing in place means no new chunk-sized buffer: on CPU every fresh one costs a page fault per
    4 KiB (50 k faults for 200 MB), about as long as the pass itself.
    """
    x = logits.float()
    keep = labels != IGNORE_INDEX
    target = torch.where(keep, labels, 0)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = ((lse - picked) * keep).sum()
    columns = torch.arange(x.shape[1], device=x.device)
    one_hot = (columns.unsqueeze(0) == target.unsqueeze(1)).to(x.dtype)
    grad = (torch.exp(x - lse.unsqueeze(1)) - one_hot) * keep.unsqueeze(1).to(x.dtype)
    logits.copy_(grad)
    return loss


def _compile_blocker(device: torch.device) -> str | None:
    """Why inductor cannot build kernels for `device` in this environment, or None when it can.

    Decided before compiling, so that a failure while compiling (a real bug) is raised, not hidden: the
    only fallbacks are a Python torch.compile does not support and a CPU without a C++ compiler.
    """
    import shutil

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        compiler = inductor_config.cpp.cxx[-1] if inductor_config.cpp.cxx else "g++"
        if shutil.which(compiler or "g++") is None and shutil.which("c++") is None:
            return f"no C++ compiler ({compiler or 'g++'}) is installed for inductor's CPU kernels"
    return None


def _chunk_kernel(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`_chunk_loss_and_dlogits_`, compiled on first use; eager (with one warning) where inductor cannot build."""
    global _compiled_chunk
    if _compiled_chunk is None:
        blocker = _compile_blocker(logits.device)
        if blocker is None:
            _compiled_chunk = torch.compile(_chunk_loss_and_dlogits_)
        else:
            warnings.warn(f"the fused LM-head loss runs eager (slower, same values): {blocker}", stacklevel=2)
            _compiled_chunk = _chunk_loss_and_dlogits_
    if _compiled_chunk is not _chunk_loss_and_dlogits_:
        # The labelled rows per chunk vary from step to step (SFT's assistant tokens): one kernel for any count,
        # instead of a recompile per count and, past dynamo's recompile limit, the eager ops (~6x slower).
        torch._dynamo.maybe_mark_dynamic(logits, 0)
        torch._dynamo.maybe_mark_dynamic(labels, 0)
    return _compiled_chunk(logits, labels)


_compiled_chunk = None

_cpu_logits_buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _logits_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, vocab] buffer for one chunk's logits (then its gradient), kept between steps on CPU.

    glibc hands a fresh 200 MB tensor straight from mmap and returns it to the OS when freed, so every
    step would page-fault the whole chunk again: on the SmolLM2 head that made its forward GEMM 307 ms
    instead of 212 ms (docs/benchmarks.md). Keeping one buffer per (vocab, dtype) costs that memory
    between steps. Elsewhere (CUDA) the caching allocator already reuses memory, so nothing is kept.
    """
    if device.type != "cpu":
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    buf = _cpu_logits_buffers.get((vocab, dtype))
    if buf is None or buf.shape[0] < rows:
        _cpu_logits_buffers.clear()  # one size in use at a time: do not hoard a buffer per shape
        buf = _cpu_logits_buffers[(vocab, dtype)] = torch.empty(rows, vocab, dtype=dtype)
    return buf[:rows]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ weight.T, labels) with both gradients computed chunk by chunk in forward.

    The saved gradients are those of the loss sum; backward scales them in place by the incoming
    scalar and hands them on (no copy of the head-sized gradient), so a second backward can only repeat
    the first (same incoming gradient, same result).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, dtype, need_h, need_w):  # type: ignore[override]
        h = hidden.to(dtype)
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        rows = h.shape[0]
        logits = _logits_buffer(min(chunk, rows), w.shape[0], dtype, h.device)  # reused by every chunk
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h_c = h[start : start + chunk]
            d = torch.mm(h_c, w.t(), out=logits[: h_c.shape[0]])
            total += _chunk_kernel(d, labels[start : start + chunk])
            if grad_h is not None:
                if grad_h.dtype == dtype:
                    torch.mm(d, w, out=grad_h[start : start + chunk])
                else:
                    grad_h[start : start + chunk] = d @ w
            if grad_w is None and need_w:  # the first chunk's product is the accumulator (fp32)
                grad_w = (d.t() @ h_c).float()
            elif grad_w is not None and dtype == torch.float32:
                grad_w.addmm_(d.t(), h_c)
            elif grad_w is not None:
                grad_w += (d.t() @ h_c).float()
        if need_w and grad_w is None:  # no rows at all: the head's gradient is zero
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # Kept as attributes, not saved tensors: they are outputs of this function (no version checks needed),
        # scaled in place by the first backward and handed out again by a repeated one.
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.need = (need_h, need_w)
        ctx.scaled_by = None
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        need_h, need_w = ctx.need
        if ctx.scaled_by is None:  # first backward: scale the saved gradients in place (no copy)
            ctx.scaled_by = grad_out.detach().clone()
            if need_h:
                grad_h.mul_(grad_out.to(grad_h.dtype))
            if need_w:
                grad_w.mul_(grad_out.to(grad_w.dtype))
        elif not torch.equal(grad_out, ctx.scaled_by):
            # A second backward with the same incoming gradient gets the same, already scaled, result (a
            # zero-bubble pipeline schedule runs backward for the input and then for the weights); another
            # scale cannot be honoured once the first was applied in place.
            raise RuntimeError(
                "linear_cross_entropy_sum's backward ran again with another incoming gradient (its saved "
                "gradients are scaled in place); compute the loss again instead of backward(retain_graph=True)"
            )
        return grad_h if need_h else None, grad_w if need_w else None, None, None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS
) -> tuple[torch.Tensor, int]:
    """Summed CE of logits = hidden @ weight.T against labels, without materializing all the logits.

    hidden [..., dim], weight [vocab, dim], labels [...] (IGNORE_INDEX rows count neither in the
    loss nor in the token count). Matmuls run in the autocast dtype when autocast is on, softmax
    always in fp32, like `token_cross_entropy_sum` on the model's logits.

    Only the labelled rows go through the head: an SFT batch's prompt and padding positions (often most of
    them) cost no vocabulary-sized matmul, forward or backward; their hidden states get a zero gradient.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1)
    labelled = flat != IGNORE_INDEX
    n_tokens = int(labelled.sum())
    if n_tokens < flat.numel():
        h, flat = h[labelled], flat[labelled]
    dtype = _compute_dtype(weight)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h.requires_grad, grad_on and weight.requires_grad
    if not (need_h or need_w):
        logits = F.linear(h, weight)  # no gradient needed: eval, reward scoring
        return token_cross_entropy_sum(logits, flat)[0], n_tokens
    with torch.autocast(h.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(h, weight, flat, chunk_tokens, dtype, need_h, need_w)
    return loss, n_tokens
