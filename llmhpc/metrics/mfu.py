"""Model FLOPs utilization: achieved training FLOP/s over the device's peak.

GPU peaks are the published dense (no sparsity) figures. CPUs differ too much between
machines of the same class to hard-code a peak, so it is measured once with a large GEMM.
"""

from __future__ import annotations

import functools
import time

import torch

# Published dense peak FLOP/s per GPU, by (name fragment, dtype).
GPU_PEAK_FLOPS = {
    ("H200", torch.bfloat16): 989e12,
    ("H100", torch.bfloat16): 989e12,  # SXM; the PCIe card is 756e12, see gpu_peak_flops
    ("A100", torch.bfloat16): 312e12,
    ("B200", torch.bfloat16): 2250e12,
}


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Published dense peak of a GPU by its CUDA device name; fp32 runs on TF32 tensor cores."""
    lookup = torch.bfloat16 if dtype in (torch.bfloat16, torch.float16, torch.float32) else dtype
    if "H100" in device_name and "PCIe" in device_name:
        return 756e12
    for (fragment, kind), peak in GPU_PEAK_FLOPS.items():
        if fragment in device_name and kind == lookup:
            return peak / (2 if dtype == torch.float32 else 1)
    return None


@functools.cache
def measured_gemm_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of repeated `size`x`size` matmuls on the CPU, with the current thread count."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm up the kernel selection
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s to divide by for MFU on this device and compute dtype."""
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
    return measured_gemm_flops(dtype if device.type == "cpu" else torch.float32)
