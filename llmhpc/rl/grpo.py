"""GRPO's arithmetic: group-relative advantages, the clipped policy-ratio loss, the k3 KL estimate, and the loss
normalizations of the variants (GRPO, DAPO, Dr. GRPO, GSPO).

Pure tensor functions, so the objective that uses them stays a few lines and tests can check them against
numbers worked out by hand. Shapes: a rollout batch holds `groups` prompts with G sampled completions each;
per-token tensors are [completions, T] with a 0/1 `mask` of the completion tokens that count.

- Advantages (DeepSeekMath, https://arxiv.org/abs/2402.03300): A = r - mean of its group, divided by the group's
  standard deviation (unbiased, as TRL computes it) unless `scale` is off (Dr. GRPO, https://arxiv.org/abs/2503.20783,
  finds the division biases toward too easy and too hard prompts).
- Policy loss per token: -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) with rho = pi / pi_old. The
  token's rho is its own ratio; under GSPO (https://arxiv.org/abs/2507.18071) every token of a completion shares
  the completion's length-normalized ratio exp(mean_t(log pi - log pi_old)). clip_high > clip_low is DAPO's
  "clip-higher" (https://arxiv.org/abs/2503.14476).
- KL to the reference per token, the k3 estimator (http://joschu.net/blog/kl-approx.html, as GRPO uses):
  exp(ref - logp) - (ref - logp) - 1, never negative, added as beta * k3 to each token's loss.
- Normalization (what the summed loss is divided by, `loss_sum_and_units`): 'sequence' (GRPO: each completion's
  token mean, then the mean over completions), 'token' (DAPO: every token of the batch weighs the same), 'fixed'
  (Dr. GRPO: the token sum over completions x max completion tokens, a constant, so no length bias).
- Dynamic sampling (DAPO): groups whose rewards are all equal are dropped and replaced by new draws until the
  batch is full (`fill_with_informative_groups`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from llmhpc.train.losses import IGNORE_INDEX
from llmhpc.train.objective import Batch, LMHead, Metric, Objective

T = TypeVar("T")

LOSS_NORMS = ("sequence", "token", "fixed")
IMPORTANCE_LEVELS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages [groups, G] of rewards [groups, G]: reward minus its group's mean, over (std + eps) if scale.

    A group whose rewards are all equal gets zero advantages either way (it teaches nothing)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2, got {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def importance_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """rho [completions, T]: per token pi / pi_old, or (GSPO, level='sequence') each completion's
    exp(mean over its masked tokens of log pi - log pi_old), repeated on each of its tokens."""
    delta = logprobs - old_logprobs
    if level == "token":
        return delta.exp()
    if level != "sequence":
        raise ValueError(f"importance level {level!r}; choose from {IMPORTANCE_LEVELS}")
    mask = mask.to(delta.dtype)
    mean = (delta * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mean.exp().expand_as(delta)


def clipped_policy_loss(
    ratio: torch.Tensor, advantages: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped low, clipped high), each [completions, T], for ratios rho [completions, T] and
    advantages [completions] (one per completion, GRPO) or [completions, T] (one per token, PPO).

    loss = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A). 'Clipped low' marks tokens whose gradient the
    lower bound removed (A < 0 and rho < 1 - clip_low), 'clipped high' the upper bound (A > 0, rho > 1 + clip_high).
    """
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    low = (adv < 0) & (ratio < 1 - clip_low)
    high = (adv > 0) & (ratio > 1 + clip_high)
    return loss, low, high


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logprobs - logprobs
    return delta.exp() - delta - 1


def loss_units(mask: torch.Tensor, norm: str, max_completion_tokens: int) -> int:
    """How many units a batch's summed loss is divided by: completions ('sequence'), completion tokens ('token'),
    or completions x max_completion_tokens ('fixed', Dr. GRPO). Known from the batch alone, before any forward."""
    if norm == "sequence":  # a completion whose tokens are all masked (e.g. overlong masking) is no unit
        return int(mask.any(dim=1).sum())
    if norm == "token":
        return int(mask.sum())
    if norm == "fixed":
        return mask.shape[0] * max_completion_tokens
    raise ValueError(f"loss normalization {norm!r}; choose from {LOSS_NORMS}")


def loss_sum_and_units(
    per_token: torch.Tensor, mask: torch.Tensor, norm: str, max_completion_tokens: int
) -> tuple[torch.Tensor, int]:
    """(summed loss, units it is a sum over) for the trainer's objective contract: the step's loss is the sum over
    micro-batches and ranks divided by the units' total, so every normalization stays exact under accumulation.

    'sequence': sum over completions of their token mean / completions. 'token': token sum / tokens. 'fixed'
    (Dr. GRPO): token sum / (completions x max_completion_tokens)."""
    units = loss_units(mask, norm, max_completion_tokens)
    mask = mask.to(per_token.dtype)
    summed = per_token * mask
    if norm == "sequence":
        return (summed.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum(), units
    return summed.sum(), units


def informative(rewards: torch.Tensor) -> torch.Tensor:
    """[groups] bool: the groups whose rewards are not all equal (an all-equal group has zero advantages)."""
    return (rewards != rewards[:, :1]).any(dim=1)


def fill_with_informative_groups(
    draw: Callable[[int], tuple[list[T], torch.Tensor]], groups: int, max_draws: int,
    any_missing: Callable[[int], bool] = lambda missing: missing > 0,
) -> tuple[list[T], torch.Tensor, dict[str, int]]:
    """Dynamic sampling (DAPO): call `draw(n)` -> (n payloads, rewards [n, G]) for as many groups as are still
    missing, keep only informative groups, until `groups` are kept or `max_draws` calls were made.

    `any_missing(missing)` decides whether another round runs; data-parallel ranks pass one that asks every rank
    (a rank already full then draws 0 groups), so all ranks sample the same number of rounds: sampling under FSDP2
    gathers parameters, a collective every rank must join.

    Returns (kept payloads, their rewards [kept, G], {'drawn', 'dropped', 'draws'}), in the order drawn; fewer than
    `groups` only when the draws ran out (the step then trains on what it has, and the counts say so)."""
    kept: list[T] = []
    kept_rewards: list[torch.Tensor] = []
    drawn = draws = 0
    while draws < max_draws and any_missing(groups - len(kept)):
        payloads, rewards = draw(groups - len(kept))
        draws += 1
        drawn += len(payloads)
        for payload, row, useful in zip(payloads, rewards, informative(rewards).tolist(), strict=True):
            if useful and len(kept) < groups:
                kept.append(payload)
                kept_rewards.append(row)
    stacked = torch.stack(kept_rewards) if kept_rewards else torch.zeros(0, 0)
    return kept, stacked, {"drawn": drawn, "dropped": drawn - len(kept), "draws": draws}


def completion_logprobs(head: LMHead, hidden: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at `labels` [B, S] (0 where IGNORE_INDEX), computing the head's logits for
    the labelled positions only."""
    mask = labels != IGNORE_INDEX
    picked = head.token_logprobs(hidden[mask] / temperature, labels[mask])
    return torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment per completion length: 0 up to max_tokens - buffer, then falling linearly
    to -1 at max_tokens (and beyond)."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float64)
    over = lengths.to(torch.float64) - (max_tokens - buffer)
    return -(over / buffer).clamp(0, 1)


class GRPOObjective(Objective):
    """The GRPO loss of a rollout batch, on any engine (it sees the model through its hidden states and head).

    A batch holds, per completion row [B, S]: `input_ids` (prompt + completion, padded), `labels` (the next token
    at every position that predicts a completion token, IGNORE_INDEX elsewhere), `old_logprobs` (the sampling
    policy's log-probs at those positions; 0 elsewhere), `advantages` [B] (or [B, S], one per token: PPO's, on
    the labelled positions), and with beta > 0 `ref_logprobs`.
    Optionally `skipped` [3]: (answers, answers with labelled tokens, their tokens) of answers left out of the batch
    because their advantage is 0 — with beta = 0 their loss and gradient are exactly 0, so they need no forward,
    but they stay units of the normalization and the step equals training on them.

    Log-probs are those of softmax(logits / temperature), the distribution the completions were sampled from
    (logits = W h, so the hidden states are divided instead). The head runs on the completion tokens only: a
    prompt position costs its share of the forward and backward through the blocks, never a vocabulary-wide
    matmul.
    """

    name = "grpo"

    def __init__(self, *, clip_low: float = 0.2, clip_high: float = 0.2, beta: float = 0.0, loss_norm: str = "token",
                 importance: str = "token", max_completion_tokens: int = 256, temperature: float = 1.0) -> None:
        if loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss normalization {loss_norm!r}; choose from {LOSS_NORMS}")
        if importance not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance level {importance!r}; choose from {IMPORTANCE_LEVELS}")
        self.clip_low, self.clip_high, self.beta = clip_low, clip_high, beta
        self.loss_norm, self.importance, self.max_completion_tokens = loss_norm, importance, max_completion_tokens
        self.temperature = temperature if temperature > 0 else 1.0  # greedy rollouts: plain softmax

    def normalizer(self, batch: Batch) -> int:
        units = loss_units(batch["labels"] != IGNORE_INDEX, self.loss_norm, self.max_completion_tokens)
        if "skipped" in batch:  # answers left out for a zero advantage still count (see the class docstring)
            rows, rows_with_tokens, tokens = (int(x) for x in batch["skipped"])
            units += {"sequence": rows_with_tokens, "token": tokens,
                      "fixed": rows * self.max_completion_tokens}[self.loss_norm]
        return units

    def loss(self, head: LMHead, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, Metric]]:
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        logprobs = completion_logprobs(head, hidden, labels, self.temperature)
        ratio = importance_ratio(logprobs, batch["old_logprobs"], mask, self.importance)
        per_token, low, high = clipped_policy_loss(ratio, batch["advantages"], clip_low=self.clip_low,
                                                   clip_high=self.clip_high)
        tokens = mask.sum().to(per_token.dtype)
        metrics: dict[str, Metric] = {
            "clip_low": ((low & mask).sum().to(per_token.dtype), tokens),
            "clip_high": ((high & mask).sum().to(per_token.dtype), tokens),
        }
        if self.beta > 0:
            kl = kl_k3(logprobs, batch["ref_logprobs"])
            per_token = per_token + self.beta * kl
            metrics["kl"] = ((kl * mask).sum().detach(), tokens)
        loss, _ = loss_sum_and_units(per_token, mask, self.loss_norm, self.max_completion_tokens)
        return loss, metrics
