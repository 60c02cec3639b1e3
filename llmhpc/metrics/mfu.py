"""Model FLOPs utilization: achieved training FLOP/s over the device's peak.

GPU peaks are the published dense (no sparsity) figures of the planner's GPU presets. CPUs differ too much between
machines of the same class to hard-code a peak, so it is measured once with a large GEMM.
"""

from __future__ import annotations

import functools
import time

import torch


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Published dense bf16 peak of a GPU by its CUDA device name (the planner's presets, llmhpc.plan.gpus);
    fp32 matmuls run on TF32 tensor cores at half of it. None for a GPU without a preset."""
    from llmhpc.plan.gpus import preset_for_device

    preset = preset_for_device(device_name)
    if preset is None:
        return None
    return preset.bf16_flops / (2 if dtype == torch.float32 else 1)


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
