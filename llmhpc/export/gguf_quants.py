"""GGUF block quantization at C speed: Q4_K (which gguf-py only dequantizes), and Q8_0 / Q4_0 / Q5_0.

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

The search is a loop of scalar float32 steps per sub-block, compiled by numba (`_fit_one`; the first use in a
fresh install compiles it, ~5 s, then the machine code is cached beside the module); the packing around it is
numpy.
"""

from __future__ import annotations

import numba
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


@numba.njit(cache=True, error_model="numpy")
def _fit_one(v: np.ndarray, best: np.ndarray, w: np.ndarray, trial: np.ndarray) -> tuple[np.float32, np.float32]:
    """One sub-block v [32]: writes its codes into `best`, returns (scale, offset); w, trial: scratch [32]."""
    f32 = np.float32
    nmax = f32(15)
    sum_x2 = f32(0)
    for i in range(SUB):
        sum_x2 += v[i] * v[i]
    av_x = np.sqrt(sum_x2 / f32(SUB))
    for i in range(SUB):
        w[i] = av_x + np.abs(v[i])
    low, high = v[0], v[0]
    sum_w = w[0]
    sum_x = sum_w * v[0]
    for i in range(1, SUB):
        low = min(low, v[i])
        high = max(high, v[i])
        sum_w += w[i]
        sum_x += w[i] * v[i]
    low = min(low, f32(0))
    if high == low:
        best[:] = 0
        return f32(0), -low
    iscale = nmax / (high - low)
    scale = f32(1) / iscale
    best_error = f32(0)
    for i in range(SUB):
        q = min(max(np.rint(iscale * (v[i] - low)), f32(0)), nmax)
        best[i] = np.uint8(q)
        diff = scale * q + low - v[i]
        best_error += w[i] * (diff * diff)
    for step in range(21):
        iscale = (f32(-1) + f32(0.1) * f32(step) + nmax) / (high - low)
        sum_l, sum_l2, sum_xl = f32(0), f32(0), f32(0)
        for i in range(SUB):
            q = min(max(np.rint(iscale * (v[i] - low)), f32(0)), nmax)
            trial[i] = np.uint8(q)
            sum_l += w[i] * q
            sum_l2 += w[i] * q * q
            sum_xl += w[i] * q * v[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:  # a sub-block of positive values: keep 0 representable, fit the scale alone
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            error = f32(0)
            for i in range(SUB):
                diff = this_scale * f32(trial[i]) + this_min - v[i]
                error += w[i] * (diff * diff)
            if error < best_error:
                best[:] = trial
                best_error, scale, low = error, this_scale, this_min  # ggml grids from the new min on
    return scale, -low


@numba.njit(parallel=True, cache=True)
def _fit_subblocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, offset >= 0, codes) per row of x [n, 32] float32, with x ~ scale * codes - offset.

    ggml's `make_qkx2_quants(32, 15, x, weights, ..., rmin=-1, rdelta=0.1, nstep=20)` with the weights of
    `quantize_row_q4_K_ref` (|x| + rms of the sub-block), as its C loop: float32 throughout, sums accumulated left
    to right, no fused multiply-adds, round half to even. That order is what makes the bytes ggml's. Compiled by
    numba with the rows spread over the cores, it runs at C speed (the whole-array numpy form of this search took
    8x llama.cpp's quantizer's time)."""
    n = x.shape[0]
    scales = np.empty(n, dtype=np.float32)
    offsets = np.empty(n, dtype=np.float32)
    codes = np.empty((n, SUB), dtype=np.uint8)
    chunk = 4096
    for first in numba.prange((n + chunk - 1) // chunk):
        w = np.empty(SUB, dtype=np.float32)
        trial = np.empty(SUB, dtype=np.uint8)
        for row in range(first * chunk, min(n, (first + 1) * chunk)):
            scales[row], offsets[row] = _fit_one(x[row], codes[row], w, trial)
    return scales, offsets, codes


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

    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    codes = _final_codes(x, step, offset, fitted)
    return np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, codes], axis=1)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _final_codes(x: np.ndarray, step: np.ndarray, offset: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """The 4-bit codes of x [n, 8, 32] against the stored (6-bit quantized) steps and offsets [n, 8], packed two per
    byte: sub-blocks 2i (low nibbles) and 2i + 1 (high nibbles) share 32 bytes. A sub-block whose step is 0 decodes
    to -offset whatever its codes; ggml keeps the fitted ones there."""
    n = x.shape[0]
    out = np.empty((n, 128), dtype=np.uint8)
    for block in numba.prange(n):
        for pair in range(4):
            for half in range(2):
                j = 2 * pair + half
                for i in range(SUB):
                    if step[block, j] > 0:
                        code = min(max(np.rint((x[block, j, i] + offset[block, j]) / step[block, j]), 0.0), 15.0)
                        q = np.uint8(code)
                    else:
                        q = fitted[block, j, i]
                    if half == 0:
                        out[block, pair * SUB + i] = q
                    else:
                        out[block, pair * SUB + i] |= q << np.uint8(4)
    return out


# ---- Q8_0, Q4_0, Q5_0: ggml's `quantize_row_q{8,4,5}_0_ref`, one block of 32 values per step ---------------

LEGACY_BLOCK = 32
"""Values per block of Q8_0, Q4_0 and Q5_0."""


def quantize_legacy(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 [..., k] (k a multiple of 32) -> uint8 [..., k // 32 * bytes] in 'q8_0' (34 bytes a block), 'q4_0'
    (18) or 'q5_0' (22): a float16 scale d, then the codes (Q5_0: their fifth bits as a little-endian uint32 first).

    The bytes of ggml's reference quantizers (and of gguf-py's numpy ones, which the tests compare against): the
    scale is amax / 127 (Q8_0) or the signed value of largest magnitude / -8 (Q4_0) or / -16 (Q5_0), the codes are
    x / d rounded half away from zero (Q8_0) or truncated after adding 8.5 / 16.5, all in float32; d is stored as
    float16 (round to nearest even), after the codes were computed from the float32 d."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.shape[-1] % LEGACY_BLOCK:
        raise ValueError(f"{kind} needs rows of a multiple of {LEGACY_BLOCK} values, got {values.shape[-1]}")
    blocks = values.reshape(-1, LEGACY_BLOCK)
    scales, codes = {"q8_0": _q8_0, "q4_0": _q4_0, "q5_0": _q5_0}[kind](blocks)
    out = np.concatenate([scales.astype(np.float16).view(np.uint8).reshape(-1, 2), codes], axis=1)
    return out.reshape(*values.shape[:-1], values.shape[-1] // LEGACY_BLOCK * out.shape[1])


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    scales = np.empty(n, dtype=np.float32)
    codes = np.empty((n, LEGACY_BLOCK), dtype=np.uint8)
    for b in numba.prange(n):
        amax = np.float32(0)
        for i in range(LEGACY_BLOCK):
            amax = max(amax, np.abs(blocks[b, i]))
        d = amax / np.float32(127)
        inverse = np.float32(1) / d if d != 0 else np.float32(0)
        scales[b] = d
        for i in range(LEGACY_BLOCK):
            x = np.float64(blocks[b, i] * inverse)  # the float32 product, rounded exactly in float64
            rounded = int(np.floor(np.abs(x) + 0.5)) * (1 if x >= 0 else -1)
            codes[b, i] = np.uint8(rounded & 0xFF)  # int8, two's complement
    return scales, codes


@numba.njit(cache=True)
def _signed_absmax(row: np.ndarray) -> np.float32:
    """The value of largest magnitude, sign kept (the first one on a tie), as ggml's Q4_0 / Q5_0 loop finds it."""
    amax, signed = np.float32(0), np.float32(0)
    for value in row:
        if amax < np.abs(value):
            amax, signed = np.abs(value), value
    return signed


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, half = blocks.shape[0], LEGACY_BLOCK // 2
    scales = np.empty(n, dtype=np.float32)
    codes = np.empty((n, half), dtype=np.uint8)
    for b in numba.prange(n):
        d = _signed_absmax(blocks[b]) / np.float32(-8)
        inverse = np.float32(1) / d if d != 0 else np.float32(0)
        scales[b] = d
        for i in range(half):
            low = min(15, int(blocks[b, i] * inverse + np.float32(8.5)))
            high = min(15, int(blocks[b, i + half] * inverse + np.float32(8.5)))
            codes[b, i] = np.uint8(low | (high << 4))
    return scales, codes


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, half = blocks.shape[0], LEGACY_BLOCK // 2
    scales = np.empty(n, dtype=np.float32)
    codes = np.empty((n, 4 + half), dtype=np.uint8)
    for b in numba.prange(n):
        d = _signed_absmax(blocks[b]) / np.float32(-16)
        inverse = np.float32(1) / d if d != 0 else np.float32(0)
        scales[b] = d
        high_bits = 0
        for i in range(half):
            low = min(31, int(blocks[b, i] * inverse + np.float32(16.5)))
            high = min(31, int(blocks[b, i + half] * inverse + np.float32(16.5)))
            codes[b, 4 + i] = np.uint8((low & 0x0F) | ((high & 0x0F) << 4))
            high_bits |= ((low >> 4) << i) | ((high >> 4) << (i + half))
        for k in range(4):
            codes[b, k] = np.uint8((high_bits >> (8 * k)) & 0xFF)
    return scales, codes
