"""The real SmolLM2-135M-Instruct GGUF: our dequantization, Q/K un-permutation and config must give
the logits and greedy tokens that transformers' own GGUF loader gives for the same file.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmhpc.assets import smollm2_gguf
from llmhpc.data.tokenizer import document_separator_id, load_tokenizer
from llmhpc.models import generate, load_pretrained

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
LONG_MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def ours():
    return load_pretrained(smollm2_gguf())


@pytest.fixture(scope="module")
def reference():
    path = smollm2_gguf()
    # Eager attention keeps the reference independent of the SDPA kernel that our model uses.
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _chat_ids(tokenizer, messages) -> torch.Tensor:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return torch.tensor([tokenizer(text)["input_ids"]])


@pytest.fixture(scope="module")
def prompt_ids(ours):
    return _chat_ids(ours[1], MESSAGES)


def test_config_from_metadata(ours):
    model, _ = ours
    cfg = model.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (30, 576, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings, cfg.max_seq_len) == (49152, 1e5, True, 8192)
    assert model.output is None and model.num_params() == 134_515_008


def test_chat_template_present(ours):
    _, tokenizer = ours
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"


def test_logits_match_transformers(ours, reference, prompt_ids):
    model, _ = ours
    with torch.no_grad():
        mine, theirs = model(prompt_ids), reference(prompt_ids).logits
    diff = (mine - theirs).abs().max().item()
    print(f"SmolLM2 GGUF logits ({prompt_ids.shape[1]} tokens): max abs diff {diff:.3g}, "
          f"logit scale {theirs.abs().max().item():.3g}")
    assert diff <= 1e-3
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))


def test_greedy_generation_matches_transformers(ours, reference):
    model, tokenizer = ours
    prompt_ids = _chat_ids(tokenizer, LONG_MESSAGES)  # a poem runs past 20 tokens: all 20 are compared
    mine = generate(model, prompt_ids, 20, eos_token_id=tokenizer.eos_token_id)
    theirs = reference.generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=20, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    print(f"greedy poem: {tokenizer.decode(mine[0, prompt_ids.shape[1]:])!r}")
    assert mine.shape[1] == prompt_ids.shape[1] + 20
    assert torch.equal(mine, theirs)


def test_answers_and_stops_at_end_of_turn(ours, prompt_ids):
    model, tokenizer = ours
    out = generate(model, prompt_ids, 20, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, prompt_ids.shape[1]:])
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer and answer.endswith("<|im_end|>") and out.shape[1] < prompt_ids.shape[1] + 20


def test_tokenizer_cache_is_fast_and_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHPC_CACHE", str(tmp_path))
    first = load_tokenizer("smollm2")  # built from the GGUF metadata, then saved
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
    start = time.perf_counter()
    second = load_tokenizer("smollm2")
    elapsed = time.perf_counter() - start
    text = first.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert second.chat_template == first.chat_template
    assert second(text)["input_ids"] == first(text)["input_ids"]
    assert document_separator_id(second) == second.convert_tokens_to_ids("<|endoftext|>") == 0
    assert elapsed < 1.5, f"cached tokenizer load took {elapsed:.2f} s"
