"""Decode-time weight packing (`llmhpc.rl.packed_weights`): the same products as `F.linear`, used where it applies.

Reference: `F.linear` on the same tensors, and the rollout engine with packing switched off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from llmhpc.config.schema import ModelConfig
from llmhpc.models import build_model
from llmhpc.rl.packed_weights import PackedWeights, bf16_packing_available, packed_linears, packing_available
from llmhpc.rl.rollout import RolloutEngine
from llmhpc.rl.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no MKL packed GEMM")


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 8])
def test_packed_product_equals_linear_for_its_rows_and_falls_back_for_others(rows):
    torch.manual_seed(0)
    weight = torch.randn(96, 40)
    packer = PackedWeights(rows)
    for shape in [(rows, 40), (rows, 1, 40), (rows + 3, 40), (2, 5, 40)]:
        x = torch.randn(shape)
        torch.testing.assert_close(packer.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert packer.held_bytes >= 4 * weight.numel()  # it did pack (MKL's buffer is at least the weight)
    packer.rows = rows + 1  # packs are for one row count: a new one starts over
    assert packer.held_bytes == 0


@torch.no_grad()
def test_what_cannot_or_may_not_be_packed_runs_plain():
    torch.manual_seed(0)
    x, weight = torch.randn(4, 16), torch.randn(8, 16)
    over_budget = PackedWeights(4, budget_bytes=4 * weight.numel() * 4 - 1)
    assert torch.equal(over_budget.linear(x, weight), F.linear(x, weight)) and over_budget.held_bytes == 0
    packer = PackedWeights(4)
    assert torch.equal(packer.linear(x.half(), weight.half()), F.linear(x.half(), weight.half()))
    assert packer.held_bytes == 0
    with torch.enable_grad():
        w = weight.clone().requires_grad_()
        packer.linear(x, w).sum().backward()  # grad mode: the plain product, which autograd can differentiate
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 16))
    assert packer.held_bytes == 0


@torch.no_grad()
def test_packed_linears_swaps_forwards_in_and_back_out_keeping_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=True))
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append("hook"))
    x = torch.randn(4, 16)
    expected = model(x)
    packer = PackedWeights(4)
    with packed_linears(model, packer):
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        assert "forward" in model[0].__dict__ and "forward" not in model[2].__dict__  # a biased Linear is left as is
    assert packer.held_bytes > 0 and calls == ["hook", "hook"]
    assert "forward" not in model[0].__dict__
    assert torch.equal(model(x), expected)


def test_engine_decodes_the_same_with_and_without_packing():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128,
                      tie_embeddings=False)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1, 7, 4, 10, 2, 6)]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    packed_engine = RolloutEngine(model, batch_size=4, eos_token_ids=[0, 6, 12])
    plain = RolloutEngine(model, batch_size=4, eos_token_ids=[0, 6, 12], pack_weights=False).generate(prompts, params)
    packed = packed_engine.generate(prompts, params)
    assert [c.tokens for c in packed] == [c.tokens for c in plain]
    for a, b in zip(packed, plain, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-5
    assert all("forward" not in m.__dict__ for m in model.modules())
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert packed_engine.stats.packed_bytes >= weights  # every matrix, the head included, was packed


@torch.no_grad()
def test_under_bf16_autocast_weights_are_cast_once_and_products_are_autocasts_own():
    torch.manual_seed(0)
    x, weight = torch.randn(8, 40), torch.randn(96, 40)
    packer = PackedWeights(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, weight)
        got = packer.linear(x, weight)
        assert packer.held_bytes == 2 * weight.numel()  # one bf16 copy, not an fp32 pack
        packer.rows = 4  # the copy serves any row count
        again = packer.linear(x[:4], weight)
    assert got.dtype == again.dtype == expected.dtype == torch.bfloat16
    assert_bf16_product(got, expected)
    assert_bf16_product(again, expected[:4])
    assert packer.held_bytes == 2 * weight.numel()


def assert_bf16_product(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to the plain bf16 product to its rounding (bit for bit where oneDNN runs the same kernel for both, as
    on the Intel Xeon with AMX measured; another CPU's kernels may sum in another order)."""
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-2)


@torch.no_grad()
@pytest.mark.skipif(not bf16_packing_available(), reason="oneDNN computes no bf16 products on this CPU (needs AVX-512)")
def test_bf16_weights_are_laid_out_once_for_onednn_and_serve_every_row_count():
    torch.manual_seed(0)
    weight = torch.randn(96, 40).bfloat16()
    packer = PackedWeights(8)
    for shape in [(8, 40), (8, 1, 40), (3, 40), (2, 5, 40)]:
        x = torch.randn(shape).bfloat16()
        assert_bf16_product(packer.linear(x, weight), F.linear(x, weight))
    assert packer.held_bytes == 2 * weight.numel()  # one copy, made once, whatever the row count


@pytest.mark.skipif(not bf16_packing_available(), reason="oneDNN computes no bf16 products on this CPU (needs AVX-512)")
def test_engine_decodes_a_bf16_model_the_same_with_and_without_packing():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128)
    model = build_model(cfg).bfloat16().eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1, 7)]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    engine = RolloutEngine(model, batch_size=4)
    packed = engine.generate(prompts, params)
    plain = RolloutEngine(model, batch_size=4, pack_weights=False).generate(prompts, params)
    assert [c.tokens for c in packed] == [c.tokens for c in plain]
    for a, b in zip(packed, plain, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 0.05
    assert engine.stats.packed_bytes == 2 * sum(p.numel() for p in model.parameters() if p.dim() == 2)


def test_engine_under_bf16_autocast_decodes_what_plain_autocast_decodes():
    """The sampler's log-probs are then those of the bf16 training forward (GRPO's old log-probs)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1, 7)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = RolloutEngine(model, batch_size=4, pack_weights=False).generate(prompts, params)
        engine = RolloutEngine(model, batch_size=4)
        cast = engine.generate(prompts, params)
    assert [c.tokens for c in cast] == [c.tokens for c in plain]
    for a, b in zip(cast, plain, strict=True):  # bit for bit where the packed product is (see assert_bf16_product)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 0.05
    assert engine.stats.packed_bytes == 2 * sum(p.numel() for p in model.parameters() if p.dim() == 2)
