"""QLoRA (`peft=qlora`): the adapted projections' frozen base is stored as NF4 and computes with the NF4 values.

References: the same model with each base weight replaced by the values torchao's NF4 dequantization gives
(plain fp32 tensors, plain LoRA): logits and adapter gradients must match; and the storage size NF4 promises.
"""

from __future__ import annotations

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.models import build_model
from llmhpc.models.adapters import nf4_values
from llmhpc.peft.lora import LoRAConfig, apply_lora, lora_modules, reset_lora_parameters
from llmhpc.peft.nf4 import quantize_base_nf4

CFG = ModelConfig(vocab_size=128, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=32)


def _adapted(dora: bool, nf4: bool):
    torch.manual_seed(0)
    model = build_model(CFG)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dora=dora))
    for _, m in lora_modules(model):
        if nf4:
            continue
        m.weight.data = nf4_values(m.weight.data)  # the reference: plain tensors holding the NF4 values
    if nf4:
        quantize_base_nf4(model)
    torch.manual_seed(1)
    reset_lora_parameters(model)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return model


@pytest.mark.parametrize("dora", [False, True])
def test_nf4_base_computes_with_its_nf4_values_and_trains_only_adapters(dora: bool):
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    quantized, reference = _adapted(dora, nf4=True), _adapted(dora, nf4=False)
    out_q, out_r = quantized(ids), reference(ids)
    assert (out_q - out_r).abs().max() <= 1e-5
    out_q.logsumexp(-1).mean().backward()
    out_r.logsumexp(-1).mean().backward()
    grads_q = {n: p.grad for n, p in quantized.named_parameters() if p.grad is not None}
    grads_r = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads_q.keys() == grads_r.keys() and all(".lora_" in n for n in grads_q)
    for name, grad in grads_q.items():
        assert (grad - grads_r[name]).abs().max() <= 1e-5 * max(1.0, grads_r[name].abs().max()), name
    # The NF4 values are not the original weights: quantization is really in the path.
    torch.manual_seed(0)
    original = build_model(CFG).layers["0"].attention.wq.weight
    assert (nf4_values(original) - original).abs().max() > 1e-3


def test_nf4_base_is_about_half_a_byte_per_weight():
    model = _adapted(dora=False, nf4=True)
    for _, m in lora_modules(model):
        weight = m.weight
        inner, _ = weight.__tensor_flatten__()
        stored = sum(getattr(weight, name).nbytes for name in inner)
        assert stored <= 0.6 * weight.numel(), (stored, weight.numel())  # 4 bits + double-quantized scales


NF4_LEVELS = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
"""The 16 NF4 levels of the QLoRA paper (appendix E), as fractions of a block's absmax."""


@pytest.mark.parametrize("shape", [(128, 128), (192, 576)])  # scaler blocks of 32 / of 8 (1728 scales)
def test_nf4_error_stays_within_its_documented_bound(shape):
    """|w - nf4(w)| <= g M + A / 256 for every weight (`llmhpc.peft.nf4` module docstring): M the absmax of its
    64-weight block, g half the widest gap between NF4 levels, A the largest |M' - mean M| of the block's scaler
    block (the 8-bit double quantization rounds each scale to a step of A / 128). Computed here from the
    weights alone; on Gaussian weights with outliers the bound is nearly reached, so it is not a loose one."""
    from llmhpc.models.adapters import NF4_BLOCK, _scaler_block

    gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:], strict=False)) / 2
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[0, :5] = 0.3  # an outlier block and an outlier scale
    error = (weight - nf4_values(weight)).flatten().view(-1, NF4_BLOCK).abs()
    absmax = weight.flatten().view(-1, NF4_BLOCK).abs().amax(1)
    per_scaler_block = _scaler_block(weight.numel())
    spread = (absmax - absmax.mean()).view(-1, per_scaler_block).abs().amax(1).repeat_interleave(per_scaler_block)
    bound = (gap * absmax + spread / 256)[:, None]
    ratio = (error / bound).max().item()
    assert 0.9 < ratio <= 1 + 1e-5, ratio
    # Relative to the whole weight: about 9% (Frobenius) for Gaussian weights.
    assert 0.05 < ((weight - nf4_values(weight)).norm() / weight.norm()).item() < 0.12


@pytest.mark.parametrize(
    ("layout", "refused"),
    [((1, 2, 1), False), ((1, 1, 2), False), ((1, 2, 2), True), ((2, 1, 1), True)],
)
def test_qlora_layouts_one_process_fsdp2_or_tp_alone(layout: tuple[int, int, int], refused: bool):
    """FSDP2 quantizes the whole base before sharding, TP each shard after: both at once has no single order."""
    from llmhpc.config import ConfigError, load_config
    from llmhpc.config.layout import ParallelDims
    from llmhpc.train.builder import _apply_lora

    dp_replicate, dp_shard, tp = layout
    dims = ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, pp=1,
                        world_size=dp_replicate * dp_shard * tp)
    cfg = load_config("sft", ["peft=qlora"])
    model = build_model(CFG, device="meta")
    if refused:
        with pytest.raises(ConfigError, match="not both at once"):
            _apply_lora(model, cfg, dims)
    else:
        assert _apply_lora(model, cfg, dims) and lora_modules(model)


def test_sharded_nf4_values_are_each_shards_own_quantization():
    """What a tensor-parallel rank computes with: its rows (dim 0) or columns (dim 1) quantized on their own."""
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    for dim in (0, 1):
        values = nf4_values(weight, shards=2, dim=dim)
        for part, own in zip(values.chunk(2, dim), weight.chunk(2, dim), strict=True):
            assert torch.equal(part, nf4_values(own.contiguous()))
        assert not torch.equal(values, nf4_values(weight))  # other blocks and scales than the whole weight's
        assert (values - weight).norm() / weight.norm() < 0.1
