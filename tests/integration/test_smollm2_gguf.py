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
from llmhpc.models import load_pretrained
from llmhpc.rl.rollout import RolloutEngine
from llmhpc.rl.sampling import SamplingParams

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


def _greedy(model, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int):
    """Our engine's greedy completion of one prompt [1, S]."""
    engine = RolloutEngine(model, batch_size=1, eos_token_ids=[tokenizer.eos_token_id])
    return engine.generate(prompt_ids.tolist(), SamplingParams(max_new_tokens=max_new_tokens, temperature=0))[0]


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
    mine = _greedy(model, tokenizer, prompt_ids, 20).tokens
    theirs = reference.generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=20, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    print(f"greedy poem: {tokenizer.decode(mine)!r}")
    assert len(mine) == 20
    assert mine == theirs[0, prompt_ids.shape[1]:].tolist()


def test_rollout_engine_greedy_on_a_left_padded_batch_matches_transformers(ours, reference):
    """Prompts of different lengths: transformers decodes them as one left-padded batch; our engine decodes them
    two rows at a time (the third joins when a row finishes). Token for token, each up to its end of turn."""
    from llmhpc.rl.rollout import RolloutEngine
    from llmhpc.rl.sampling import SamplingParams

    model, tokenizer = ours
    questions = ["What is 7 times 8?", "Name a colour.", "A train travels 60 km in one hour. How far does it go in "
                 "three hours at the same speed? Answer with a number."]
    prompts = [_chat_ids(tokenizer, [{"role": "user", "content": q}])[0].tolist() for q in questions]
    assert len({len(p) for p in prompts}) == 3
    engine = RolloutEngine(model, batch_size=2, eos_token_ids=[tokenizer.eos_token_id])
    mine = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[:, width:]
    for completion, row in zip(mine, theirs.tolist(), strict=True):
        print(f"engine: {tokenizer.decode(completion.tokens)!r} ({completion.finish_reason})")
        assert completion.tokens == row[: len(completion.tokens)]
        if completion.finish_reason == "stop":
            assert completion.tokens[-1] == tokenizer.eos_token_id
        else:
            assert len(completion.tokens) == 24
    assert {c.finish_reason for c in mine} == {"stop", "length"}


def test_answers_and_stops_at_end_of_turn(ours, prompt_ids):
    model, tokenizer = ours
    out = _greedy(model, tokenizer, prompt_ids, 20)
    answer = tokenizer.decode(out.tokens)
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer and answer.endswith("<|im_end|>") and len(out.tokens) < 20
    assert out.finish_reason == "stop"


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
