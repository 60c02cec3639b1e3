"""How close to the published peaks a software stack gets: the planner's only tunable numbers.

Each fraction below is an a-priori figure (named source or stated assumption), except
`calibration`, which is fitted to exactly one published run per stack and documented as such in
docs/planner.md; every other published run the tests compare with is out of sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmhpc.config.validate import ConfigError

MATMUL_BF16_FRACTION = 0.80
"""Share of the dense BF16 peak a large cuBLAS GEMM reaches on H100 (~790 of 989 TFLOP/s for 8k-sized GEMMs
in NVIDIA's and public cuBLAS benchmarks); used for every GPU."""
MATMUL_FP8_FRACTION = 0.65
"""Share of the dense FP8 peak large FP8 GEMMs reach (~1,300 of 1,979 TFLOP/s on H100; FP8 GEMMs are further
from peak than BF16 ones because operand loads, not math, limit them)."""
ATTENTION_FRACTION = 0.50
"""Share of the BF16 peak of FlashAttention forward + backward with causal masking on H100: FlashAttention-2
reaches 35-50 %, FlashAttention-3 up to 75 % forward, less backward (Shah et al. 2024, arXiv:2407.08608)."""
HBM_FRACTION = 0.80
"""Share of the HBM bandwidth elementwise kernels (norms, RoPE, SwiGLU, casts, optimizer) achieve."""
LINK_FRACTION = 0.80
"""Share of the per-direction link bandwidth a large NCCL ring all-gather / reduce-scatter achieves
(nccl-tests bus bandwidth on DGX H100 NVLink and on 400 Gb/s InfiniBand is ~80 % of the line rate)."""
ZBV_BUBBLE_FRACTION = 1 / 3
"""Pipeline bubble of the zero-bubble V schedule relative to 1F1B's: 1/3 is what Qi et al. 2023
(arXiv:2401.10241) give for ZB-H1; ZB-V claims less, so this is conservative."""
ATTENTION_BACKWARD_FACTOR = 2.5
"""FlashAttention backward does 5 of the forward's 2 matmuls' worth (it recomputes the scores): 2.5x forward."""


@dataclass(frozen=True)
class Stack:
    """Efficiency assumptions of one training software stack."""

    name: str
    """Preset name (`plan.stack`)."""
    elementwise_traffic: float
    """Bytes moved by elementwise kernels, relative to llmhpc's eager block (see throughput.EW_ACCESSES)."""
    compiled_traffic: float
    """The same with parallel.compile=true (inductor fuses chains of elementwise ops)."""
    tp_exposed: float
    """Share of tensor-parallel communication not hidden behind compute."""
    param_gather_bytes: float | None
    """Bytes per parameter in data-parallel weight all-gathers; None: the run's parameter dtype (llmhpc's FSDP2
    mixed-precision policy: bf16 under precision=bf16 / fp8, fp32 in fp32). Float8 under precision=fp8 in any case."""
    grad_reduce_bytes: float
    """Bytes per parameter in gradient reduce-scatters / all-reduces."""
    grad_reduce_once: bool
    """Gradients are reduced once per step (after accumulation), not after every micro-batch."""
    calibration: float
    """Achieved / modelled compute rate, fitted on `calibrated_on` (the only fitted number)."""
    calibrated_on: str
    """The one published run `calibration` was fitted to."""


STACKS: dict[str, Stack] = {
    "llmhpc": Stack(
        "llmhpc", elementwise_traffic=1.0, compiled_traffic=0.5, tp_exposed=1.0, param_gather_bytes=None,
        grad_reduce_bytes=4, grad_reduce_once=False, calibration=0.631,
        calibrated_on="torchtitan, Llama 3.1 8B, 8x H100, FSDP, bf16 eager, local batch 2 x 8192, selective AC: "
        "5,762 tokens/s/GPU (benchmarks/llama3_h100_202412_torchtitan.md, Table 1)",
    ),
    "megatron": Stack(
        "megatron", elementwise_traffic=0.4, compiled_traffic=0.4, tp_exposed=0.3, param_gather_bytes=2,
        grad_reduce_bytes=2, grad_reduce_once=True, calibration=0.889,
        calibrated_on="NeMo 24.12, Llama 2 7B, 8x H100, FP8, TP1 PP1, GBS 128 x 4096: 16,934 tokens/s/GPU "
        "(NeMo Framework performance summary)",
    ),
}
"""'llmhpc': this code base (FSDP2 gathering bf16 weights under bf16 / fp8, fp32 ones in fp32, and reduce-scattering
fp32 gradients after every micro-batch; eager unfused norms/RoPE/SwiGLU, TP collectives in the critical path), the
same structure as torchtitan.
'megatron': Megatron-Core / NeMo (Transformer Engine fused kernels: assumed 40 % of the eager elementwise
traffic; userbuffer TP overlap: assumed 70 % hidden; distributed optimizer reducing bf16 gradients once per step)."""


def stack(name: str) -> Stack:
    """The preset `plan.stack` names, or a one-line `ConfigError`."""
    if name not in STACKS:
        raise ConfigError(f"plan.stack={name!r} is not one of: {', '.join(STACKS)}")
    return STACKS[name]
