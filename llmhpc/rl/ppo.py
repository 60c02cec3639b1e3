"""PPO's arithmetic for RLHF: per-token rewards with a KL penalty, GAE, whitening, the clipped value loss and the
KL coefficient controllers (fixed, adaptive).

Pure tensor functions (the clipped policy loss is GRPO's, `llmhpc.rl.grpo.clipped_policy_loss`, with one advantage
per token), so tests can check each against a plain reference. Shapes: per-token tensors are [B, T] over the
answer tokens of B rollouts, with a 0/1 `mask` of the tokens that count (an answer's tokens, padding after it 0).

- Rewards (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022): every answer token gets
  -kl_coef * (log pi - log pi_ref), the sampled token's KL estimate, and the last one also the reward model's (or
  reward function's) score of the whole answer.
- GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438): delta_t = r_t + gamma V_{t+1} - V_t (V after the
  last token is 0), A_t = delta_t + gamma lambda A_{t+1}; returns R_t = A_t + V_t are the critic's targets.
- Advantages are whitened over the batch's masked tokens (mean 0, std 1) before the policy loss.
- Value loss: 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -c, c): the critic moves
  at most c away from its rollout-time values per update, as the policy's ratio is clipped.
- The critic trains with `ValueObjective` (a model with a score head, e.g. started from the reward model); the
  actor with GRPO's objective given one advantage per token (`llmhpc.rl.grpo.GRPOObjective`).
- KL coefficient: fixed, or adaptive (Ziegler et al.): after each rollout batch with mean KL k and target K,
  coef *= 1 + clip(k / K - 1, -0.2, 0.2) * n / horizon (n: rollouts in the batch), so it grows while the policy
  drifts past the target and shrinks while it stays within.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmhpc.train.losses import IGNORE_INDEX
from llmhpc.train.objective import Batch, LMHead, Metric, Objective


def answer_ends(mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the last token of each answer. A row holds one answer (its masked tokens) or, in GRPO's shared-
    prompt rows (`llmhpc.rl.group_rollouts.shared_prompt_rows`), several back to back: an answer ends where the
    next position is unmasked, or starts over (its position is not the next one), or the row ends."""
    mask = mask.bool()
    following = torch.zeros_like(mask)
    following[:, :-1] = mask[:, 1:]
    if position_ids is not None:
        following[:, :-1] &= position_ids[:, 1:] == position_ids[:, :-1] + 1
    return mask & ~following


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T], per-token KL estimate [B, T]): -kl_coef * (logprobs - ref_logprobs) on every masked token,
    plus each answer's score on its last token (`ends`, default: each row's last masked token); 0 where the mask
    is 0. `scores` is one per row [B], or per token [B, T] (each answer's score on its tokens)."""
    ends = answer_ends(mask) if ends is None else ends
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    per_token = scores[:, None] if scores.dim() == 1 else scores
    return -kl_coef * kl + per_token.to(kl.dtype) * ends, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95, ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each [B, T], by generalized advantage estimation over each answer's tokens (module
    docstring); the value after an answer's last token (`ends`, default: each row's last masked token) is 0 and
    padding contributes nothing."""
    ends = answer_ends(mask) if ends is None else ends
    mask = mask.to(values.dtype)
    going_on = 1.0 - ends.to(values.dtype)  # 0 where an answer ends: nothing of the next one flows back into it
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value * going_on[:, t] - values[:, t]
        running = (delta + gamma * lam * running * going_on[:, t]) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`values` scaled to unit variance over the masked entries (and centred on 0 if shift_mean); 0 elsewhere."""
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped) [B, T]: 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, ±clip);
    'clipped' marks the tokens where the clipped term is the larger (its gradient is then 0)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


@dataclass
class KLController:
    """The KL penalty's coefficient: fixed (target=None) or adaptive (Ziegler et al. 2019, module docstring)."""

    coef: float
    """The current coefficient."""
    target: float | None = None
    """Adaptive: the mean per-rollout KL aimed at; None keeps coef fixed."""
    horizon: int = 10000
    """Adaptive: rollouts over which a full proportional correction is applied (larger: slower changes)."""

    def update(self, kl: float, rollouts: int) -> float:
        """After a rollout batch whose mean per-rollout KL was `kl`; returns the new coefficient."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * rollouts / self.horizon
        return self.coef


class ValueObjective(Objective):
    """The critic's clipped value loss (`clipped_value_loss`), on any engine the reward model trains on.

    A batch holds, per rollout row [B, S]: `input_ids` (prompt + answer, padded), `labels` (the next token at every
    position that predicts an answer token, IGNORE_INDEX elsewhere: the positions the actor's log-probs and the
    advantages live on), `old_values` and `returns` [B, S] (0 elsewhere). The critic is a model with a score head:
    its value of a position is the head at that position's hidden state, the state before the next answer token is
    drawn. The unit is an answer token: the step's loss is the mean over the batch's answer tokens."""

    name = "value"

    def __init__(self, *, clip: float = 0.2) -> None:
        self.clip = clip

    def normalizer(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, head: LMHead, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, Metric]]:
        mask = batch["labels"] != IGNORE_INDEX
        values = head.scores(hidden[mask])
        old, returns = batch["old_values"][mask].to(values.dtype), batch["returns"][mask].to(values.dtype)
        per_token, clipped = clipped_value_loss(values, old, returns, self.clip)
        tokens = torch.tensor(float(values.numel()), device=values.device)
        metrics: dict[str, Metric] = {
            "value_clipped": (clipped.to(values.dtype).sum(), tokens),
            "value_error": (((values.detach() - returns) ** 2).sum(), tokens),
        }
        return per_token.sum(), metrics
