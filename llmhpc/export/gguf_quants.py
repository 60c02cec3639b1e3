"""GGUF quantization that gguf-py does not implement: Q4_K, in numpy (gguf-py only dequantizes it).

Q4_K (ggml's `block_q4_K`, 144 bytes per 256 values): a super-block of 256 values is 8 sub-blocks of 32, each
stored as 4-bit codes q with value = d * sc_j * q - dmin * m_j. `d` and `dmin` are float16 per super-block;
the 8 sub-block scales `sc_j` and mins `m_j` are 6-bit integers packed into 12 bytes:

    bytes 0-3   low 6 bits: sc_0..sc_3          top 2 bits: high bits of sc_4..sc_7
    bytes 4-7   low 6 bits: m_0..m_3            top 2 bits: high bits of m_4..m_7
    bytes 8-11  low nibble: low 4 bits of sc_4..sc_7, high nibble: low 4 bits of m_4..m_7

then 128 bytes of codes: for each 64 values, 32 bytes whose low nibbles are values 0-31 and high nibbles
values 32-63. `gguf.quants.dequantize` (gguf-py's reading of the format) is the reference the tests decode
with.

Each sub-block's (scale, min) is chosen as ggml's reference quantizer (`quantize_row_q4_K_ref`) does: a
weighted least-squares fit (weights |x| + rms of the sub-block) over 21 candidate grids around
(max - min) / 15, keeping the best; the 8 scales and mins are then quantized to 6 bits against the
super-block's largest, and the codes recomputed with the quantized values. The arithmetic is float32 in ggml's
order of operations, so the bytes are those of ggml's reference quantizer (checked against it compiled from
llama.cpp's source: identical on normal, heavy-tailed, one-signed and constant data), not merely close.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
SUB = 32
BLOCK_BYTES = 144

_CHUNK = 1 << 20
"""Values quantized at a time (bounds the temporaries of the search)."""


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float32 [..., k] (k a multiple of 256) -> uint8 [..., k // 256 * 144] in Q4_K."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, got {values.shape[-1]}")
    flat = values.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], BLOCK_BYTES), dtype=np.uint8)
    step = max(1, _CHUNK // QK_K)
    for at in range(0, flat.shape[0], step):
        out[at : at + step] = _quantize_blocks(flat[at : at + step])
    return out.reshape(*values.shape[:-1], values.shape[-1] // QK_K * BLOCK_BYTES)


def _sum(a: np.ndarray) -> np.ndarray:
    """Row sums in float32, accumulated left to right as ggml's C loops do (numpy's pairwise sums round
    differently, which flips near-tie choices of the search below)."""
    return np.cumsum(a, axis=1, dtype=np.float32)[:, -1]


def _fit_subblocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, offset >= 0, codes) per row of x [n, 32] float32, with x ~ scale * codes - offset.

    ggml's `make_qkx2_quants(32, 15, x, weights, ..., rmin=-1, rdelta=0.1, nstep=20)`, in float32 with its
    order of operations, so that the result is byte-identical to ggml's reference quantizer."""
    f32 = np.float32
    nmax = f32(15)
    weights = np.sqrt(_sum(x * x) / f32(32))[:, None] + np.abs(x)
    low = np.minimum(x.min(axis=1), f32(0))
    high = x.max(axis=1)
    flat = high == low
    span = np.where(flat, f32(1), high - low)
    sum_w = _sum(weights)
    sum_x = _sum(weights * x)

    def codes(iscale, origin):
        return np.clip(np.rint(iscale[:, None] * (x - origin[:, None])), 0, nmax)

    def error(scale, offset, q):
        diff = scale[:, None] * q + offset[:, None] - x
        return _sum(weights * (diff * diff))

    iscale = nmax / span
    best_scale = f32(1) / iscale
    best_min = low.copy()
    best_q = codes(iscale, low)
    best_err = error(best_scale, best_min, best_q)
    for step in range(21):
        # ggml grids from the best min found so far (its loop updates `min` in place), not the data's min
        origin = np.where(flat, low, best_min)
        q = codes((f32(-1) + f32(0.1) * f32(step) + nmax) / np.where(flat, f32(1), high - origin), origin)
        sum_l, sum_l2, sum_xl = _sum(weights * q), _sum(weights * q * q), _sum(weights * q * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, f32(1))
        scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = offset > 0  # a sub-block of positive values: keep 0 representable, fit the scale alone
        scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), scale)
        offset = np.where(positive, f32(0), offset)
        err = error(scale, offset, q)
        better = ok & (err < best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, offset, best_min)
        best_q = np.where(better[:, None], q, best_q)
        best_err = np.where(better, err, best_err)
    best_scale = np.where(flat, f32(0), best_scale)
    best_q = np.where(flat[:, None], f32(0), best_q)
    return best_scale.astype(f32), (-best_min).astype(f32), best_q.astype(np.uint8)


def _quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [n, 256] -> uint8 [n, 144] (ggml's `quantize_row_q4_K_ref`)."""
    f32 = np.float32
    n = blocks.shape[0]
    x = blocks.reshape(n, 8, SUB).astype(f32)
    scales, mins, fitted = _fit_subblocks(x.reshape(-1, SUB))
    scales, mins, fitted = scales.reshape(n, 8), mins.reshape(n, 8), fitted.reshape(n, 8, SUB)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.clip(np.rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)

    step = d.astype(f32)[:, None] * ls.astype(f32)  # what a reader multiplies the codes by
    offset = dmin.astype(f32)[:, None] * lm.astype(f32)
    live = step > 0
    q = np.rint((x + offset[..., None]) / np.where(live, step, f32(1))[..., None])
    # a sub-block whose 6-bit scale is 0 decodes to -offset whatever its codes; ggml keeps the fitted ones
    q = np.where(live[..., None], np.clip(q, 0, 15).astype(np.uint8), fitted)  # [n, 8, 32]

    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    pairs = q.reshape(n, 4, 2, SUB)  # sub-blocks 2i (low nibbles) and 2i+1 (high nibbles) share 32 bytes
    codes = (pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)).reshape(n, 128)
    return np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, codes], axis=1)
