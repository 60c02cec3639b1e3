"""The rollout engine (`llmhpc.rl.rollout`) and its sampler (`llmhpc.rl.sampling`).

References: the model's plain forward over the whole sequence, recomputed for every new token (no cache); the
same requests run one at a time; and the filtered softmax computed by hand for the sampler.
"""

from __future__ import annotations

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.models import build_model
from llmhpc.models.llama import KVCache
from llmhpc.rl.rollout import RolloutEngine
from llmhpc.rl.sampling import SamplingParams, request_generator, sample

VOCAB = 96
EOS = list(range(0, VOCAB, 6))  # one token in six ends a completion: rows finish at different steps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1, 7, 4, 10, 2, 6)]


@torch.no_grad()
def _recomputed_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from a full forward over the whole sequence for every token."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(max_new):
        logits = model(torch.tensor([ids]))[0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        ids.append(token)
        if token in EOS:
            break
    return tokens, logprobs


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_cached_greedy_decoding_equals_full_recompute(model, prompts, batch_size):
    engine = RolloutEngine(model, batch_size=batch_size, eos_token_ids=EOS)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, completion in zip(prompts, completions, strict=True):
        tokens, logprobs = _recomputed_greedy(model, prompt, 12)
        assert completion.tokens == tokens
        assert max(abs(a - b) for a, b in zip(completion.logprobs, logprobs, strict=True)) <= 1e-5
        assert completion.finish_reason == ("stop" if tokens[-1] in EOS else "length")
    assert {c.finish_reason for c in completions} == {"stop", "length"}  # both kinds of ending were exercised
    assert engine.stats.generated_tokens == sum(len(c.tokens) for c in completions)


def test_rows_that_join_mid_rollout_sample_what_they_sample_alone(model, prompts, monkeypatch):
    """Sampling (temperature, top-k, top-p) with two rows for ten prompts: eight prompts join a running batch,
    into a cache that runs out of columns and is compacted; each completion equals its request run alone."""
    from llmhpc.rl import rollout

    moves = []  # (capacity, shift, first column kept) of every reallocation of the shared cache
    reallocate = rollout._RowCache._reallocate
    monkeypatch.setattr(rollout._RowCache, "_reallocate", lambda self, *args: (moves.append(args),
                                                                               reallocate(self, *args)))
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    engine = RolloutEngine(model, batch_size=2, eos_token_ids=EOS)
    together = engine.generate(prompts, params)
    assert len(set(engine.stats.timeline)) == 2  # two rows most steps, one at the end
    assert any(first > 0 for _, _, first in moves), moves  # dead columns were dropped
    monkeypatch.undo()
    for i, prompt in enumerate(prompts):
        alone = RolloutEngine(model, batch_size=1, eos_token_ids=EOS).generate([prompt], params, request_ids=[i])[0]
        assert together[i].tokens == alone.tokens, i
        assert max(abs(a - b) for a, b in zip(together[i].logprobs, alone.logprobs, strict=True)) <= 1e-5
    other_seed = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [c.tokens for c in other_seed] != [c.tokens for c in together]


def test_a_prompt_asked_several_times_is_prefilled_once(model, prompts):
    """A GRPO group: each of three prompts sampled four times; their prompts are computed once each and every
    answer is the one its request samples alone."""
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=2)
    asked = [p for p in prompts[:3] for _ in range(4)]
    engine = RolloutEngine(model, batch_size=12, eos_token_ids=EOS)
    together = engine.generate(asked, params)
    assert engine.stats.prefilled_tokens == sum(len(p) for p in prompts[:3]) < engine.stats.prompt_tokens
    assert len({tuple(c.tokens) for c in together}) > 3  # the copies drew different answers
    for i, prompt in enumerate(asked):
        alone = RolloutEngine(model, batch_size=1, eos_token_ids=EOS).generate([prompt], params, request_ids=[i])[0]
        assert together[i].tokens == alone.tokens, i


def test_log_probs_of_sampled_tokens_are_the_models(model, prompts):
    """Each sampled token's log-prob is log softmax(logits / T) of the full-sequence forward at its position."""
    params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=1)
    completions = RolloutEngine(model, batch_size=4, eos_token_ids=EOS).generate(prompts[:4], params)
    for prompt, completion in zip(prompts[:4], completions, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion.tokens]))[0, len(prompt) - 1 : -1]
        expected = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(completion.tokens)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5)


def test_sampler_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -8.0]])
    draws = 4000

    def frequencies(params: SamplingParams) -> torch.Tensor:
        counts = torch.zeros(logits.shape[1])
        for i in range(draws):
            token, logprob, entropy = sample(logits, params, [request_generator(params.seed, i)])
            counts[token] += 1
            log_p = (logits / params.temperature).log_softmax(-1)[0]
            assert torch.allclose(logprob, log_p[token])
            assert torch.allclose(entropy, -(log_p.exp() * log_p).sum())  # of the unfiltered softmax
        return counts / draws

    probs = (logits[0] / 0.8).softmax(-1)
    plain = frequencies(SamplingParams(temperature=0.8))
    assert (plain - probs).abs().max() < 0.03
    top3 = frequencies(SamplingParams(temperature=0.8, top_k=3))
    assert (top3 - torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(5)])).abs().max() < 0.03
    # top_p = 0.8: the first two tokens hold 0.72 of the mass, so the third is kept and nothing after it.
    assert probs[:2].sum() < 0.8 <= probs[:3].sum()
    nucleus = frequencies(SamplingParams(temperature=0.8, top_p=0.8))
    assert nucleus[3:].sum() == 0 and (nucleus[:3] - probs[:3] / probs[:3].sum()).abs().max() < 0.03
    greedy = sample(logits, SamplingParams(temperature=0), [torch.Generator()])[0]
    assert int(greedy) == 0 and int(sample(logits, SamplingParams(top_k=1), [torch.Generator()])[0]) == 0


def test_stop_strings_end_a_completion_at_the_token_that_completes_them(model, prompts):
    letters = "abcdefghijklmnopqrstuvwxyz"

    def decode(ids: list[int]) -> str:
        return "".join(letters[t % 26] for t in ids)

    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    engine = RolloutEngine(model, batch_size=4, decode=decode)
    free = engine.generate(prompts[:4], greedy)
    text = decode(free[1].tokens)
    assert len(text) == 12 and free[1].finish_reason == "length"
    stop = text[5:7]
    first = text.index(stop)
    stopped = engine.generate(prompts[:4], SamplingParams(**{**greedy.__dict__, "stop": [stop]}))
    assert stopped[1].tokens == free[1].tokens[: first + 2] and stopped[1].finish_reason == "stop"


def test_bad_requests_are_refused_with_the_reason(model):
    engine = RolloutEngine(model, batch_size=2)
    with pytest.raises(ValueError, match="stop strings need the engine's decode"):
        engine.generate([[1, 2]], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=128"):
        engine.generate([[1] * 100], SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.generate([[1]], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1], []])


def test_a_model_whose_blocks_were_compiled_decodes_eagerly_and_the_same(model, prompts):
    """parallel.compile=true compiles each block; a rollout (SFT's in-run eval, GRPO) must still run, with the
    eager tokens: inductor cannot lower the packed decode products, and every step has another cache length."""
    params = SamplingParams(max_new_tokens=8, temperature=0)
    eager = RolloutEngine(model, batch_size=4, eos_token_ids=EOS).generate(prompts, params)
    compiled = build_model(model.cfg).eval()
    compiled.load_state_dict(model.state_dict())
    for block in compiled.layers.values():
        block.compile()
    try:
        again = RolloutEngine(compiled, batch_size=4, eos_token_ids=EOS).generate(prompts, params)
    finally:
        torch._dynamo.reset()
    assert [c.tokens for c in again] == [c.tokens for c in eager]


@torch.no_grad()
def test_under_bf16_autocast_the_cache_holds_bf16_and_attention_is_unchanged(model, prompts):
    """Autocast casts keys and values to bf16 at every attention call: a bf16 cache gives the same logits bit for
    bit, without re-casting the whole cache at every decode step."""
    ids = torch.tensor([prompts[3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_cache = model.new_cache(1, ids.shape[1] + 2)
        fp32_cache = KVCache(model.cfg, 1, ids.shape[1] + 2, dtype=torch.float32)
        logits = []
        for cache in (bf16_cache, fp32_cache):
            first = model(ids, cache=cache)
            logits.append((first, model(first[:, -1:].argmax(-1), cache=cache)))
    assert bf16_cache.keys[0].dtype == torch.bfloat16 and fp32_cache.keys[0].dtype == torch.float32
    assert torch.equal(logits[0][0], logits[1][0]) and torch.equal(logits[0][1], logits[1][1])
    assert model.new_cache(1, 4).keys[0].dtype == torch.float32  # without autocast, the weights' dtype
