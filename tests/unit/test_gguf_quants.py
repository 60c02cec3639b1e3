"""Our compiled Q8_0 / Q4_0 / Q5_0 quantizers write the bytes of gguf-py's numpy ones (an independent implementation
that follows ggml's reference C), on ordinary weights and on the blocks where rounding and ties decide: zeros,
constants, a value exactly halfway between two codes, opposite values of equal magnitude, huge and tiny scales.
Q4_K is pinned against ggml itself in tests/integration/test_convert_gguf.py."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llmhpc.export.gguf_quants import quantize_legacy


def _hard_rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    x[0] = 0
    x[1] = 0.5
    x[2] = -0.5
    x[3, :32] = np.arange(32, dtype=np.float32) - 15.5  # every code sits halfway
    x[4, :32] = (np.arange(32, dtype=np.float32) - 16) / 127 * 3
    x[5, :32] = np.where(np.arange(32) % 2, 1.0, -1.0)  # a tie in magnitude: the first one's sign wins
    x[6] = rng.standard_normal(96).astype(np.float32) * 1e4
    x[7] = rng.standard_normal(96).astype(np.float32) * 1e-7
    x[8, 5] = np.float32(1e-3)  # one live value in a block of zeros
    return x


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_0"])
def test_legacy_quantizers_write_gguf_py_bytes(kind):
    qtype = GGMLQuantizationType[kind.upper()]
    weights = (np.random.default_rng(1).standard_normal((300, 576)) * 0.05).astype(np.float32)
    for values in (_hard_rows(), weights):
        ours = quantize_legacy(values, kind)
        assert ours.dtype == np.uint8 and ours.shape == quantize(values, qtype).shape
        assert np.array_equal(ours, quantize(values, qtype))
    # On ordinary weights it decodes within one step (the block's largest magnitude / the code range's half) of
    # the values. (Blocks of values under ~1e-5 lose their float16 scale to underflow, in ggml as here.)
    step = np.abs(weights.reshape(-1, 32)).max(axis=1, keepdims=True) / {"q8_0": 127, "q4_0": 8, "q5_0": 16}[kind]
    error = np.abs(dequantize(quantize_legacy(weights, kind), qtype).reshape(-1, 32) - weights.reshape(-1, 32))
    assert (error <= 1.01 * step).all()


def test_legacy_quantizer_refuses_ragged_rows():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_legacy(np.zeros((2, 40), dtype=np.float32), "q8_0")
