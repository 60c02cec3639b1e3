"""QLoRA: the frozen base of the adapted projections stored as 4-bit NormalFloat (https://arxiv.org/abs/2305.14314).

Each `LoRALinear`'s base weight becomes torchao's `NF4Tensor` (blocks of 64 weights with an absmax scale, the
scales double-quantized), about 0.53 bytes per weight instead of 4 in fp32. The forward dequantizes it to the
input's dtype inside the matmul (torchao implements `F.linear` for it), so compute stays fp32 or bf16; the
adapters stay in full precision and are what trains. The embedding, head and norms stay unquantized, as in
QLoRA. Quantize after the base holds its final weights (initialized or loaded) and before the adapters are
drawn (DoRA's magnitude is the norm of the quantized base's rows).
"""

from __future__ import annotations

from torch import nn

from llmhpc.models.adapters import to_nf4
from llmhpc.peft.lora import lora_modules


def quantize_base_nf4(model: nn.Module) -> int:
    """Store every adapted projection's base weight as NF4, in place; returns how many were quantized (a weight
    whose size is not a multiple of 64 stays in full precision)."""
    count = 0
    for _, module in lora_modules(model):
        quantized = to_nf4(module.weight)
        if quantized is not None:
            module.weight = nn.Parameter(quantized, requires_grad=False)
            count += 1
    return count
