"""QLoRA: the frozen base of the adapted projections stored as 4-bit NormalFloat (https://arxiv.org/abs/2305.14314).

Each `LoRALinear`'s base weight becomes torchao's `NF4Tensor` (blocks of 64 weights with an absmax scale, the
scales double-quantized), about 0.53 bytes per weight instead of 4 in fp32. The forward dequantizes it to the
input's dtype for the matmul (`llmhpc.peft.frozen.frozen_linear`), so compute stays fp32 or bf16; the adapters
stay in full precision and are what trains. The embedding, head and norms stay unquantized, as in
QLoRA. Quantize after the base holds its final weights (initialized or loaded) and before the adapters are
drawn (DoRA's magnitude is the norm of the quantized base's rows).

Error bound, per weight w: |w - nf4(w)| <= 0.1519 M + A / 256, where M is the absmax of w's 64-weight block,
0.1519 half the widest gap between the 16 NF4 levels (-1 to -0.6962), and A the largest |M' - mean(M)| in the
block's scaler block (double quantization stores each M - mean(M) in 8 bits, a rounding step of A / 128). The
first term is rounding w / M to the nearest level, the second the rounding of M itself. On Gaussian weights the
Frobenius error is about 9% of the weight (tests/unit/test_qlora.py checks both).
"""

from __future__ import annotations

from torch import nn

from llmhpc.models.adapters import to_nf4
from llmhpc.peft.lora import lora_modules


def quantize_base_nf4(model: nn.Module) -> int:
    """Store every adapted projection's base weight as NF4, in place; returns how many were quantized (a weight
    that does not split into 8 equal runs of 64-weight blocks stays in full precision, see `to_nf4`).

    A tensor-parallel weight (a DTensor) is quantized shard by shard: each rank quantizes its own rows or columns
    and keeps them as the DTensor's local NF4 tensor (`llmhpc.peft.frozen.frozen_linear` multiplies with it).
    The values then differ slightly from the whole weight's quantization (`trained_base` gives them)."""
    count = 0
    for _, module in lora_modules(model):
        weight = module.weight
        sharded = hasattr(weight, "device_mesh")
        quantized = to_nf4(weight.to_local() if sharded else weight)
        if quantized is None:
            continue
        if sharded:
            from torch.distributed.tensor import DTensor

            quantized = DTensor.from_local(quantized, weight.device_mesh, weight.placements, shape=weight.shape,
                                           stride=weight.stride(), run_check=False)
        module.weight = nn.Parameter(quantized, requires_grad=False)
        count += 1
    return count
