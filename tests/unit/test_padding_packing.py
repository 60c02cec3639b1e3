"""Padded and packed batches: every row (every packed document) must get the logits it gets alone.

Post-training builds on this: SFT packs documents into one row (document_ids + position_ids that
restart per document), DPO and GRPO batch prompts of unequal length by left-padding them
(attention_mask), and rollouts decode such a batch through one KV cache. Two references: the same
model run on each row / document alone, and transformers' LlamaForCausalLM with the same weights and
its own padding mask and packed-sequence handling.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmhpc.config.schema import ModelConfig, RopeScalingConfig
from llmhpc.models import Llama, build_model
from llmhpc.models.hf import config_to_hf, state_dict_to_hf
from llmhpc.models.llama import attention_mask_for, document_mask, token_positions

TOL = 1e-5

CONFIGS = {
    "gqa_tied": ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96),
    "llama3_rope_untied": ModelConfig(
        vocab_size=80, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, rope_theta=5e5,
        rope_scaling=RopeScalingConfig(type="llama3", factor=8.0, original_max_position_embeddings=16),
        tie_embeddings=False,
    ),
}

PROMPT_LENGTHS = [7, 12, 3]
PACKED_LENGTHS = [[5, 9, 6], [12, 8], [3, 3, 14]]


def _model(name: str, seed: int = 0) -> Llama:
    cfg = CONFIGS[name]
    cfg.max_seq_len = 40
    cfg.init_std = 0.1  # logits of order 1-5: padding or position errors show up far above TOL
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _left_padded(lengths: list[int], vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, max(lengths)]; the padding holds random tokens, not a pad id,
    so a padding key that leaks into attention changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return ids, mask


def _packed(rows: list[list[int]], vocab: int, seed: int = 2) -> tuple[torch.Tensor, ...]:
    """input_ids, document_ids and position_ids (restarting at 0 per document) of packed rows."""
    gen = torch.Generator().manual_seed(seed)
    width = sum(rows[0])
    assert all(sum(r) == width for r in rows)
    ids = torch.randint(0, vocab, (len(rows), width), generator=gen)
    docs = torch.stack([torch.arange(len(r)).repeat_interleave(torch.tensor(r)) for r in rows])
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    return ids, docs, pos


def _documents(rows: list[list[int]]):
    """(row, start, length) of every packed document."""
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            yield b, start, n
            start += n


def _hf_twin(model: Llama) -> LlamaForCausalLM:
    """transformers' Llama holding exactly our weights (eager attention, fp32)."""
    hf_cfg = LlamaConfig(**config_to_hf(model.cfg))
    hf_cfg._attn_implementation = "eager"
    twin = LlamaForCausalLM(hf_cfg).eval()
    state = state_dict_to_hf(model.state_dict())
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    twin.load_state_dict(state, strict=True)
    return twin


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_left_padded_rows_match_rows_alone(name: str) -> None:
    model = _model(name)
    ids, mask = _left_padded(PROMPT_LENGTHS, model.cfg.vocab_size)
    width = ids.shape[1]
    padded = model(ids, attention_mask=mask)
    assert torch.isfinite(padded).all()  # padding queries too (they may attend only to themselves)
    worst = max(
        _max_diff(padded[b, width - n :], model(ids[b : b + 1, width - n :])[0]) for b, n in enumerate(PROMPT_LENGTHS)
    )
    print(f"{name}: left-padded vs alone, max abs diff {worst:.3g}")
    assert worst <= TOL
    # RoPE is relative, so the logits alone cannot tell the positions apart: check them directly.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(token_positions(3, width, 0, attention_mask=mask), positions)
    assert torch.equal(positions[2, -3:], torch.arange(3))
    # Every query keeps at least one visible key (itself), else SDPA may return NaN for padding rows.
    visible = attention_mask_for(3, width, 0, attention_mask=mask)
    assert visible.any(-1).all() and not visible[0, 0, -1, : width - 7].any()
    assert _max_diff(model(ids, attention_mask=mask.bool(), position_ids=positions), padded) <= TOL
    # The mask is doing the work: without it the shorter rows see their padding.
    assert _max_diff(model(ids)[0, width - 7 :], padded[0, width - 7 :]) > 1e-2


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_packed_documents_match_documents_alone(name: str) -> None:
    model = _model(name)
    ids, docs, pos = _packed(PACKED_LENGTHS, model.cfg.vocab_size)
    packed = model(ids, document_ids=docs, position_ids=pos)
    worst = max(
        _max_diff(packed[b, s : s + n], model(ids[b : b + 1, s : s + n])[0]) for b, s, n in _documents(PACKED_LENGTHS)
    )
    print(f"{name}: packed vs alone, max abs diff {worst:.3g}")
    assert worst <= TOL
    # RoPE is relative: with the document mask, global positions (pretraining's) give the same logits.
    assert _max_diff(model(ids, document_ids=docs), packed) <= TOL
    # The document mask is doing the work: restarted positions alone do not separate documents.
    assert _max_diff(model(ids, position_ids=pos)[0, 5:14], packed[0, 5:14]) > 1e-2
    # Padding and packing combine: right-pad a packed row, mask the padding.
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    both = model(ids, document_ids=docs, position_ids=pos, attention_mask=mask)
    assert _max_diff(both[:, :-3], packed[:, :-3]) <= TOL and torch.isfinite(both).all()


@torch.no_grad()
def test_max_seq_len_checks_the_largest_position_used() -> None:
    model = _model("gqa_tied")  # max_seq_len 40
    rows = [[20, 25], [30, 15]]  # rows of 45 tokens, no document longer than 30
    ids, docs, pos = _packed(rows, model.cfg.vocab_size)
    packed = model(ids, document_ids=docs, position_ids=pos)
    worst = max(_max_diff(packed[b, s : s + n], model(ids[b : b + 1, s : s + n])[0]) for b, s, n in _documents(rows))
    assert worst <= TOL
    with pytest.raises(ValueError, match="max_seq_len=40"):
        model(ids)  # 45 global positions
    with pytest.raises(ValueError, match=r"31\.\.40"):
        model(ids[:, :10], position_ids=torch.arange(31, 41).expand(2, 10))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids[:, :10], attention_mask=torch.ones(2, 9))


@torch.no_grad()
def test_packed_rows_compile_into_one_graph() -> None:
    """parallel.compile=true compiles the whole model in one process; a packed SFT batch (position and document
    ids) must not break its graph (a break splits the compiled forward and prints a warning in every run)."""
    model = _model("gqa_tied")
    ids, docs, pos = _packed([[20, 12], [14, 18]], model.cfg.vocab_size)
    explained = torch._dynamo.explain(model)(ids, document_ids=docs, position_ids=pos)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_padding_and_packing_match_transformers(name: str) -> None:
    model = _model(name)
    twin = _hf_twin(model)
    ids, mask = _left_padded(PROMPT_LENGTHS, model.cfg.vocab_size)
    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = model(ids, attention_mask=mask)
    theirs = twin(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    padded = max(_max_diff(ours[b, width - n :], theirs[b, width - n :]) for b, n in enumerate(PROMPT_LENGTHS))

    ids, docs, pos = _packed(PACKED_LENGTHS, model.cfg.vocab_size)
    ours = model(ids, document_ids=docs, position_ids=pos)
    # transformers finds the packed documents from position ids that restart (no 2-D mask, no cache).
    theirs = twin(ids, position_ids=pos, use_cache=False).logits
    packed = _max_diff(ours, theirs)

    # Uneven gaps between positions (RoPE is relative, so only those test the per-row angles);
    # an all-ones mask keeps transformers from reading the gaps as document boundaries.
    gaps = torch.randint(1, 4, ids.shape, generator=torch.Generator().manual_seed(4))
    pos = (gaps.cumsum(-1) - gaps[:, :1]).clamp(max=model.cfg.max_seq_len - 1)
    ours = model(ids, position_ids=pos)
    theirs = twin(ids, attention_mask=torch.ones_like(ids), position_ids=pos, use_cache=False).logits
    gapped = _max_diff(ours, theirs)
    assert _max_diff(ours, model(ids)) > 1e-2
    print(f"{name}: vs transformers, left-padded {padded:.3g}, packed {packed:.3g}, gapped positions {gapped:.3g}")
    assert padded <= TOL and packed <= TOL and gapped <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_kv_cache_decodes_left_padded_rows_as_alone(name: str) -> None:
    model = _model(name)
    steps = 5
    ids, mask = _left_padded(PROMPT_LENGTHS, model.cfg.vocab_size)
    width = ids.shape[1]
    # Teacher-forced continuation tokens (not argmax, so near-ties cannot change the path).
    gen = torch.Generator().manual_seed(5)
    new = torch.randint(0, model.cfg.vocab_size, (len(PROMPT_LENGTHS), steps), generator=gen)
    cache = model.new_cache(len(PROMPT_LENGTHS), width + steps)
    batched = [model(ids, attention_mask=mask, cache=cache)]
    for t in range(steps):
        mask = torch.cat([mask, torch.ones(len(PROMPT_LENGTHS), 1, dtype=mask.dtype)], dim=1)
        batched.append(model(new[:, t : t + 1], attention_mask=mask, cache=cache))
    batched_logits = torch.cat(batched, dim=1)
    assert cache.length == width + steps and torch.isfinite(batched_logits).all()
    worst = 0.0
    for b, n in enumerate(PROMPT_LENGTHS):
        alone_cache = model.new_cache(1, n + steps)
        alone = [model(ids[b : b + 1, width - n :], cache=alone_cache)]
        alone += [model(new[b : b + 1, t : t + 1], cache=alone_cache) for t in range(steps)]
        worst = max(worst, _max_diff(batched_logits[b, width - n :], torch.cat(alone, dim=1)[0]))
    print(f"{name}: KV-cache decode of a left-padded batch vs rows alone, max abs diff {worst:.3g}")
    assert worst <= TOL


@torch.no_grad()
def test_kv_cache_with_document_ids_matches_full_forward() -> None:
    model = _model("gqa_tied")
    ids, docs, pos = _packed(PACKED_LENGTHS, model.cfg.vocab_size)
    full = model(ids, document_ids=docs, position_ids=pos)
    cache = model.new_cache(3, 20)
    pieces = [model(ids[:, :8], document_ids=docs[:, :8], position_ids=pos[:, :8], cache=cache)]
    pieces += [
        model(ids[:, t : t + 1], document_ids=docs[:, : t + 1], position_ids=pos[:, t : t + 1], cache=cache)
        for t in range(8, 20)
    ]
    assert _max_diff(torch.cat(pieces, dim=1), full) <= TOL


def test_default_path_keeps_the_causal_kernel_and_its_numbers(monkeypatch) -> None:
    model = _model("gqa_tied")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    docs = (torch.arange(24) >= 10).long().expand(2, 24)

    def previous(document_ids: torch.Tensor | None) -> torch.Tensor:
        """The forward as it was before padding support: a table slice and is_causal or a document mask."""
        cos, sin = model.rope_cos[:24], model.rope_sin[:24]
        mask = None if document_ids is None else document_mask(document_ids)
        h = model.tok_embeddings(ids)
        for name, block in model.layers.items():
            h = block(h, cos, sin, mask, None, int(name), 0)
        return model.logits(model.norm(h))

    with torch.no_grad():
        assert torch.equal(model(ids), previous(None))
        assert torch.equal(model(ids, document_ids=docs), previous(docs))

    calls: list[dict] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append({"mask": kwargs.get("attn_mask"), "is_causal": kwargs.get("is_causal", False)})
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model(ids).sum().backward()  # training path, with grad
    assert len(calls) == model.cfg.n_layers
    assert all(c["mask"] is None and c["is_causal"] for c in calls), calls
    calls.clear()
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids))
    assert all(c["mask"] is not None and c["mask"].dtype == torch.bool and not c["is_causal"] for c in calls)


@torch.no_grad()
def test_pipeline_stages_take_padding_and_positions() -> None:
    from llmhpc.parallel.pipeline import StageModule

    model = _model("llama3_rope_untied")  # pipelines never tie the embeddings
    first, last = StageModule(model, 0, 2, range(0, 1)), StageModule(model, 1, 2, range(1, 2))

    def whole(ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """The unsplit model's counterpart of the last stage's output (final hidden states or logits)."""
        hidden = model(ids, return_hidden=True, **kwargs)
        return hidden if staged.shape[-1] == hidden.shape[-1] else model.logits(hidden)

    ids, mask = _left_padded(PROMPT_LENGTHS, model.cfg.vocab_size)
    staged = last(first(ids, attention_mask=mask), attention_mask=mask)
    assert _max_diff(staged, whole(ids, attention_mask=mask)) <= TOL
    ids, docs, pos = _packed(PACKED_LENGTHS, model.cfg.vocab_size)
    staged = last(first(ids, docs, position_ids=pos), docs, position_ids=pos)
    assert _max_diff(staged, whole(ids, document_ids=docs, position_ids=pos)) <= TOL
    assert _max_diff(staged, last(first(ids, docs), docs)) <= TOL  # relative RoPE: restarts change nothing here
