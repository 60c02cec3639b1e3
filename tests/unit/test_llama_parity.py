"""The llmhpc Llama must compute what transformers' LlamaForCausalLM computes, and convert both ways.

transformers (eager attention, fp32) is the numerical reference; weights travel through real
HF-format files in both directions, so a wrong name, layout or config key fails here.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmhpc.config import load_config
from llmhpc.config.schema import ModelConfig, RopeScalingConfig
from llmhpc.models import Llama, build_model, load_pretrained
from llmhpc.models.hf import config_from_hf, config_to_hf, save_hf, state_dict_to_hf

TOL = 1e-4

CONFIGS = {
    "gqa_tied": ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96),
    "6h_2kv_untied": ModelConfig(
        vocab_size=100, dim=72, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=100, tie_embeddings=False
    ),
    "theta5e5_llama3": ModelConfig(
        vocab_size=80, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=128, rope_theta=5e5,
        rope_scaling=RopeScalingConfig(type="llama3", factor=8.0, original_max_position_embeddings=64),
        tie_embeddings=False,
    ),
    "explicit_head_dim": ModelConfig(
        vocab_size=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=20, ffn_dim=80, norm_eps=1e-6
    ),
}


def _small(cfg: ModelConfig) -> ModelConfig:
    # Larger weights than the training init make logits O(1-10), so layout errors cannot hide.
    cfg.max_seq_len = 160
    cfg.init_std = 0.15
    return cfg


def _hf_reference(directory) -> LlamaForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_after_save_hf(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(_small(CONFIGS[name])).eval()
    save_hf(model, tmp_path)
    reference = _hf_reference(tmp_path)
    # Every tensor arrived (nothing randomly initialized by transformers behind our back).
    ref_state = reference.state_dict()
    for key, value in state_dict_to_hf(model.state_dict()).items():
        assert torch.equal(ref_state[key], value), key
    ids = torch.randint(0, model.cfg.vocab_size, (2, 150))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max abs diff {diff:.3g} (logit scale {theirs.abs().max().item():.3g})")
    assert diff <= TOL


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_save_pretrained_loads_into_ours(tied, tmp_path):
    torch.manual_seed(1)
    hf_cfg = LlamaConfig(
        vocab_size=90, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, initializer_range=0.15,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        attn_implementation="eager",
    )
    reference = LlamaForCausalLM(hf_cfg).eval()
    reference.save_pretrained(tmp_path)
    model, tokenizer = load_pretrained(tmp_path)
    assert tokenizer is None
    assert model.cfg.tie_embeddings is tied and (model.output is None) is tied
    assert model.cfg.rope_scaling.type == "llama3" and model.cfg.rope_theta == 5e5
    ids = torch.randint(0, 90, (2, 100))
    with torch.no_grad():
        theirs = reference(ids).logits
        diff = (model(ids) - theirs).abs().max().item()
    print(f"save_pretrained -> load_pretrained (tied={tied}): max abs diff {diff:.3g} "
          f"(logit scale {theirs.abs().max().item():.3g})")
    assert diff <= TOL


def test_legacy_rope_keys_are_read():
    legacy = {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }
    cfg = config_from_hf(legacy)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.factor == 8.0
    assert cfg.head_dim is None and not cfg.tie_embeddings
    with pytest.raises(ValueError, match="yarn"):
        config_from_hf({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**legacy, "attention_bias": True})


def test_meta_build_then_init_weights():
    cfg = ModelConfig(
        vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, init_std=0.03
    )
    meta = build_model(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    assert not any(p.is_meta for p in model.parameters()) and not model.rope_cos.is_meta
    wq = model.layers["0"].attention.wq.weight
    wo = model.layers["0"].attention.wo.weight
    assert abs(wq.std().item() - 0.03) < 0.003
    assert abs(model.tok_embeddings.weight.std().item() - 0.03) < 0.003
    assert abs(wo.std().item() - 0.03 / math.sqrt(2 * cfg.n_layers)) < 0.002
    assert torch.equal(model.norm.weight, torch.ones(128))
    fresh = Llama(cfg)  # eager build: RoPE tables straight from the constructor
    assert torch.equal(model.rope_cos, fresh.rope_cos) and torch.equal(model.rope_sin, fresh.rope_sin)
    logits = model(torch.randint(0, 512, (2, 64)))
    assert torch.isfinite(logits).all()
    # Untrained logits are near uniform: log-softmax loss close to log(vocab).
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 512, (128,)))
    assert abs(loss.item() - math.log(512)) < 0.1


def test_document_masking_equals_separate_documents():
    torch.manual_seed(2)
    model = build_model(_small(CONFIGS["6h_2kv_untied"])).eval()
    lengths = [[5, 11, 3, 13], [32]]
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32))
    doc_ids = torch.stack([torch.arange(len(row)).repeat_interleave(torch.tensor(row)) for row in lengths])
    with torch.no_grad():
        packed = model(ids, document_ids=doc_ids)
        worst = 0.0
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(ids[b : b + 1, start : start + n])[0]
                worst = max(worst, (packed[b, start : start + n] - alone).abs().max().item())
                start += n
        unmasked = model(ids)
    print(f"document masking vs separate documents: max abs diff {worst:.3g}")
    assert worst <= TOL
    assert (unmasked[0, 5:] - packed[0, 5:]).abs().max() > 1e-2  # the mask did change something


def test_kv_cache_matches_full_recomputation():
    torch.manual_seed(3)
    model = build_model(_small(CONFIGS["theta5e5_llama3"])).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 40)
        # prefill 16, a chunk of 8 after cached positions, then single tokens
        pieces = [model(ids[:, :16], cache=cache), model(ids[:, 16:24], cache=cache)]
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(24, 40)]
    diff = (torch.cat(pieces, dim=1) - full).abs().max().item()
    print(f"KV cache logits vs full forward: max abs diff {diff:.3g}")
    assert diff <= TOL and cache.length == 40


PRESETS = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, tied, rope type, expected params)
    "tiny": (256, 6, 8, 4, 768, 49152, True, "default", None),
    "smollm2_135m": (576, 30, 9, 3, 1536, 49152, True, "default", 134_515_008),
    "llama3_8b": (4096, 32, 32, 8, 14336, 128256, False, "llama3", 8.03e9),
    "llama3_70b": (8192, 80, 64, 8, 28672, 128256, False, "llama3", 70.6e9),
    "llama3_405b": (16384, 126, 128, 8, 53248, 128256, False, "llama3", 405.9e9),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_map_to_hf_shapes_and_param_counts(name):
    hidden, layers, heads, kv, inter, vocab, tied, rope, params = PRESETS[name]
    cfg = load_config("pretrain", [f"model={name}"]).model
    hf = LlamaConfig(**config_to_hf(cfg))
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (
        hidden, layers, heads, kv)
    assert (hf.intermediate_size, hf.vocab_size, hf.tie_word_embeddings) == (inter, vocab, tied)
    assert hf.rope_parameters["rope_type"] == rope and hf.head_dim == hidden // heads
    model = build_model(cfg, device="meta")
    n = model.num_params()
    with torch.device("meta"):
        hf_n = sum(p.numel() for p in LlamaForCausalLM(hf).parameters())
    assert n == hf_n
    if params is not None:
        assert abs(n - params) / params < 0.001, n
    matmul_params = n - vocab * hidden + (vocab * hidden if tied else 0)  # output projection, not the lookup
    expected_flops = 6 * matmul_params + 12 * layers * heads * (hidden // heads) * 4096
    assert model.flops_per_token(4096) == expected_flops
