"""Choosing the next token from logits: greedy, temperature, top-k, top-p, each row from its own random stream.

Each request owns a `torch.Generator`, and one uniform draw of it picks that row's token (inverse CDF), so what a
request samples depends on its seed and its logits only, never on which other requests share the batch: a
prompt refilled into a freed row mid-rollout samples exactly what it samples alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How a rollout decodes (the knobs of `transformers.GenerationConfig` and vLLM's `SamplingParams` we keep)."""

    max_new_tokens: int = 256
    """Generated tokens per prompt at most (a row that reaches it finishes with reason 'length')."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy decoding (argmax, no randomness)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p (1: no limit)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion once its decoded text contains one (needs the engine's `decode`); the
    token that completes the string is kept."""
    seed: int = 0
    """Request i samples from a generator seeded with (seed, i): reproducible whatever the batch is."""

    def validate(self) -> None:
        """Raise ValueError naming the field for a setting that cannot decode."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


def request_generator(seed: int, request: int) -> torch.Generator:
    """The random stream of request number `request` of a rollout seeded with `seed`."""
    return torch.Generator().manual_seed(seed * 1_000_003 + request)


def _filtered(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """scores [N, V] (logits / temperature, fp32) with everything outside top-k and the top-p nucleus set to
    -inf."""
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = scores.topk(params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # A token is dropped when the tokens above it already reach top_p (the first one always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return scores


def sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(next token [N], its log-probability [N], the entropy of the distribution [N]) for logits [N, V], row i
    drawing from generators[i].

    The log-probability and the entropy are those of softmax(logits / temperature) over the whole vocabulary
    (greedy: temperature 1), before top-k / top-p: the policy's own distribution, what an RL objective
    recomputes from the same logits when it trains.
    """
    if params.temperature == 0:
        scores = logits.float()  # exact for bf16 logits, whose own argmax is ~10x slower on CPU
        tokens = scores.argmax(dim=-1)
        log_probs = scores.log_softmax(dim=-1)
        return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1), _entropy(log_probs, log_probs.exp())
    scaled = logits.float() / params.temperature
    log_probs = scaled.log_softmax(dim=-1)
    full = log_probs.exp()
    filtered = 0 < params.top_k < scaled.shape[-1] or params.top_p < 1
    probs = _filtered(scaled, params).softmax(dim=-1) if filtered else full
    draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(probs.dtype)
    cdf = probs.cumsum(dim=-1)
    tokens = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    # The first token whose CDF reaches the draw has probability > 0, except for a draw of exactly 0.
    stray = probs.gather(-1, tokens[:, None]).squeeze(-1) == 0
    tokens = torch.where(stray, (probs > 0).int().argmax(dim=-1), tokens)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1), _entropy(log_probs, full)


def _entropy(log_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row, from log-probabilities [N, V] of finite logits and their exp."""
    return -(probs * log_probs).sum(dim=-1)
