"""GPU presets: the published peak figures the planner divides work by.

Every number is the vendor's dense (no 2:4 sparsity) figure for one GPU; links are per GPU and per
direction, because a ring collective moves each byte over one direction of each link. Sources are
the NVIDIA datasheets named on each preset (see docs/planner.md for links).
"""

from __future__ import annotations

from dataclasses import dataclass

TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class GpuSpec:
    """Published figures of one GPU model, in SI units (FLOP/s, bytes, bytes/s)."""

    name: str
    """Human-readable name, for reports."""
    bf16_flops: float
    """Dense BF16 tensor-core peak, FLOP/s (fp32 matmuls run on TF32 at half of it)."""
    fp8_flops: float | None
    """Dense FP8 tensor-core peak, FLOP/s; None where the GPU has no FP8 tensor cores."""
    hbm_bytes: float
    """HBM capacity in bytes (decimal GB as the datasheet states it)."""
    hbm_bw: float
    """HBM bandwidth, bytes/s."""
    nvlink_bw: float
    """Intra-node GPU-to-GPU bandwidth per GPU and direction, bytes/s (half the datasheet's bidirectional
    NVLink figure; the PCIe card has no all-to-all NVLink, so its PCIe Gen5 x16 figure is used)."""
    network_bw: float
    """Inter-node bandwidth per GPU and direction, bytes/s: one 400 Gb/s NDR InfiniBand NIC per GPU as in
    DGX H100/H200/B200 (50 GB/s), 200 Gb/s HDR per GPU in DGX A100 (25 GB/s)."""
    source: str
    """Where the figures come from."""


GPUS: dict[str, GpuSpec] = {
    "h100_sxm": GpuSpec(
        "H100 SXM5 80GB", 989.4 * TB, 1978.9 * TB, 80 * GB, 3.35 * TB, 450 * GB, 50 * GB,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM column; 1,979 / 3,958 TFLOPS are with sparsity); DGX H100 "
        "user guide (8x ConnectX-7 400 Gb/s)",
    ),
    "h100_pcie": GpuSpec(
        "H100 PCIe 80GB", 756.5 * TB, 1513 * TB, 80 * GB, 2.0 * TB, 64 * GB, 50 * GB,
        "NVIDIA H100 Tensor Core GPU datasheet (PCIe column); PCIe Gen5 x16 = 128 GB/s bidirectional",
    ),
    "h200": GpuSpec(
        "H200 SXM 141GB", 989.4 * TB, 1978.9 * TB, 141 * GB, 4.8 * TB, 450 * GB, 50 * GB,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM column)",
    ),
    "a100": GpuSpec(
        "A100 SXM4 80GB", 312 * TB, None, 80 * GB, 2.039 * TB, 300 * GB, 25 * GB,
        "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM column); DGX A100 (8x ConnectX-6 200 Gb/s)",
    ),
    "b200": GpuSpec(
        "B200 180GB", 2250 * TB, 4500 * TB, 180 * GB, 8.0 * TB, 900 * GB, 50 * GB,
        "NVIDIA DGX B200 datasheet (72 PFLOPS FP8 training / 8 GPUs, sparse; 1,440 GB, 64 TB/s HBM3e; "
        "NVLink 5 1.8 TB/s per GPU; 8x ConnectX-7 400 Gb/s)",
    ),
}
"""Presets by the name `cluster.gpu` takes."""


def gpu_spec(name: str) -> GpuSpec:
    """The preset called `name`, or a `ConfigError` listing the presets."""
    if name not in GPUS:
        from llmhpc.config.validate import ConfigError

        raise ConfigError(f"cluster.gpu={name!r} is not a GPU preset; use one of: {', '.join(GPUS)}")
    return GPUS[name]


def preset_for_device(device_name: str) -> GpuSpec | None:
    """The preset matching a CUDA device name ('NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', ...), if any."""
    name = device_name.upper()
    if "H100" in name:
        return GPUS["h100_pcie" if "PCIE" in name else "h100_sxm"]
    for key in ("h200", "a100", "b200"):
        if key.upper() in name:
            return GPUS[key]
    return None
