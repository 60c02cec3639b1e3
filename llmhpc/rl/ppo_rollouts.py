"""PPO's batch source: prompts -> sampled answers -> rewards, KL penalty, critic values -> GAE -> micro-batches.

It is GRPO's source (`GroupRollouts`: the prompt stream, seeded sampling, reward functions, micro-batches, exact
resume) with PPO's advantages in place of group-relative ones, and with the critic trained on each rollout:

1. sample `samples_per_prompt` answers per prompt and score them (reward functions, and / or a reward model);
2. per micro-batch: the reference's log-probs (the starting model), the critic's values at every position that
   predicts an answer token, per-token rewards (-kl_coef x the sampled token's KL estimate, plus the score on
   the last token), GAE advantages and returns (`llmhpc.rl.ppo`);
3. whiten the advantages over the rollout batch's answer tokens (statistics over every dp rank); the actor
   then trains `updates` steps on these micro-batches with the clipped ratio objective (GRPO's, one advantage
   per token);
4. the critic takes `updates` optimizer steps of the clipped value loss on the same micro-batches, here, before
   the actor's first step (its loss does not depend on the actor, so the order changes nothing), and the
   adaptive KL coefficient moves toward its target.

With `settings.shared_prompt`, a prompt's answers share one row (GRPO's `shared_prompt_rows`): the reference, the
critic and both updates then run the prompt's tokens once per group, and the score, the KL rewards and GAE are
each answer's own (`llmhpc.rl.ppo.answer_ends` finds where one answer stops and the next starts).

With `group_baseline`, step 2 uses each answer's score minus the mean score of its prompt's answers: the returns
then carry no prompt's difficulty (which a critic learns slowly, from a few prompts per rollout), only what
distinguishes answers to the same prompt, and a prompt whose answers all score alike gets the KL penalty alone.

With `critic_warmup` = N, the first N rollout batches go through steps 1-4 for the critic only (the KL
coefficient stays) and never reach the actor: a critic that starts as a new head, or as a reward model scoring
partial answers, first learns to predict the returns, so the actor's first advantages are not its noise.

The critic's weights and optimizer are a component of every checkpoint (`critic`), and the KL coefficient and the
critic's last metrics are part of this source's state, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmhpc.rl.group_rollouts import Batch, GroupRollouts, _Stats
from llmhpc.rl.ppo import KLController, ValueObjective, answer_ends, gae, token_rewards
from llmhpc.train.engine import Engine
from llmhpc.train.losses import IGNORE_INDEX
from llmhpc.train.objective import MODEL_INPUTS, LMHead, model_inputs


@dataclass
class AdvantageSettings:
    """How PPO turns a rollout into advantages (`ppo.*` of the config)."""

    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    group_baseline: bool = False
    """Center each answer's score on the mean score of its prompt's answers before the KL penalty and GAE."""


class Critic:
    """The value model: its values for a rollout's micro-batches, and its optimizer steps on the value loss."""

    def __init__(self, engine: Engine, *, lr: float, grad_clip: float, value_clip: float) -> None:
        self.engine, self.lr, self.grad_clip = engine, lr, grad_clip
        self.objective = ValueObjective(clip=value_clip)
        self.device = next(engine.model.parameters()).device

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def values(self, batch: Batch) -> torch.Tensor:
        """[B, S] values at the positions that predict an answer token (0 elsewhere), fp32 on the CPU."""
        model = self.engine.model
        model.eval()
        try:
            with self.engine.autocast():
                batch = self.to_device(batch)
                hidden = model(**model_inputs(batch), return_hidden=True)
                mask = batch["labels"] != IGNORE_INDEX
                scores = LMHead(model).scores(hidden[mask]).float()
                return torch.zeros(mask.shape, device=scores.device).masked_scatter(mask, scores).cpu()
        finally:
            model.train()

    def train(self, batches: list[Batch], updates: int) -> dict[str, float]:
        """`updates` optimizer steps, each over all `batches` (one rollout); the last step's means."""
        dp = self.engine.dp
        keys = ("input_ids", "labels", "old_values", "returns", *MODEL_INPUTS)
        micro = [self.to_device({k: batch[k] for k in keys if k in batch}) for batch in batches]
        (normalizer,) = dp.sum_ints(sum(self.objective.normalizer(b) for b in micro))
        for group in self.engine.lr_groups():
            group["lr"] = self.lr
        out: dict[str, float] = {}
        for _ in range(updates):
            self.engine.zero_grad()
            sums = self.engine.forward_backward(micro, self.objective, normalizer)
            names, flat = sums.flat()
            flat = dp.sum(flat)
            loss = float(flat[0]) / max(normalizer, 1)
            grad_norm, _ = self.engine.update(self.grad_clip if self.grad_clip > 0 else math.inf,
                                              math.isfinite(loss))
            out = {"value_loss": loss, "value_grad_norm": grad_norm}
            for i, name in enumerate(names):
                out[name] = float(flat[1 + 2 * i]) / max(float(flat[2 + 2 * i]), 1e-30)
        return out


class PPORollouts(GroupRollouts):
    """A `BatchSource` of PPO micro-batches (module docstring). `settings.group_size` is samples per prompt;
    `reference` is required while the KL coefficient can be non-zero."""

    def __init__(self, *args, critic: Critic, kl: KLController, advantage: AdvantageSettings,
                 critic_warmup: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.critic, self.kl, self.advantage = critic, kl, advantage
        self.critic_warmup = critic_warmup
        """Rollouts the critic trains on alone before the actor's first one (none of them reaches the actor)."""
        self.warmed = 0
        """Warm-up rollouts done."""
        self.settings.skip_zero_advantage = False  # a zero score still leaves a KL reward on every token

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_coef": self.kl.coef, "critic_warmed": self.warmed}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl.coef = float(state["kl_coef"])
        self.warmed = int(state.get("critic_warmed", 0))

    def _rollout(self) -> None:
        """The next rollout batch for the actor, after the critic's warm-up rollouts if they are still to do."""
        while self.rollouts == 0 and self.warmed < self.critic_warmup:  # never once the actor has trained
            self._collect()  # the critic trains on it; the KL coefficient stays (the actor has not moved)
            self.warmed += 1
        metrics, answers = self._collect()
        # every rank moves the coefficient by the same step: the KL and answer count of the whole rollout batch
        self.kl.update(metrics["kl"], answers * self.ranks)
        self.served = 0
        self.rollouts += 1
        self._metrics = {**metrics, "rollout": float(self.rollouts)}

    def _collect(self) -> tuple[dict[str, float], int]:
        """Sample and score a rollout batch into `self.batches` (advantages, returns, old values), train the critic
        on it; (its metrics reduced over the dp ranks, this rank's answers)."""
        s = self.settings
        stats = _Stats()
        for name in ("reward", "completion_length", "truncated", "entropy"):
            stats.add(name, 0.0, 0.0)  # every rank reports every name
        groups, _ = self._draw(s.groups, stats)
        stats.means.pop("zero_std_fraction", None)  # GRPO's (groups of equal rewards): no meaning here
        rows = []
        for group in groups:
            scores = group.rewards - group.rewards.mean() if self.advantage.group_baseline else group.rewards
            for completion, reward, score in zip(group.completions, group.rewards.tolist(), scores.tolist(),
                                                 strict=True):
                rows.append((group.prompt.ids, completion, score, False))  # the score rides as 'advantages'
                stats.add("reward", reward)
                stats.add("completion_length", len(completion.tokens))
                stats.add("truncated", float(completion.finish_reason == "length"))
                stats.add("entropy", completion.entropy * len(completion.tokens), len(completion.tokens))
        stats.maxima["completion_length_max"] = float(max((len(r[1].tokens) for r in rows), default=0))
        self.batches = self._micro_batches(rows)
        kl_coef = self.kl.coef
        answers = 0
        kl_total = 0.0
        resident = self.reference.resident() if self.reference is not None else nullcontext()
        with torch.no_grad(), resident:  # an offloaded reference comes in once per rollout
            for batch in self.batches:
                mask = batch["labels"] != IGNORE_INDEX
                old = batch["old_logprobs"]
                ref = self.reference(batch).float() if self.reference is not None else old
                values = self.critic.values(batch)
                scores = batch.pop("advantages").float()  # [rows], or [rows, S] in shared-prompt rows
                ends = answer_ends(mask, batch.get("position_ids"))
                rewards, kl = token_rewards(scores, old, ref, mask, kl_coef, ends)
                advantages, returns = gae(rewards, values, mask, self.advantage.gamma, self.advantage.lam, ends)
                batch.update(advantages=advantages, old_values=values, returns=returns)
                answers += int(ends.sum())
                kl_total += float(kl.sum())
                stats.add("value_mean", float((values * mask).sum()), float(mask.sum()))
                for name, x in (("return", returns), ("value_residual", returns - values)):  # explained variance
                    stats.add(f"_{name}", float((x * mask).sum()), float(mask.sum()))
                    stats.add(f"_{name}_sq", float((x * x * mask).sum()), float(mask.sum()))
        if self.advantage.whiten:
            self._whiten()
        stats.add("kl", kl_total, answers)
        stats.add("kl_coef", kl_coef)
        critic_metrics = self.critic.train(self.batches, s.updates)
        metrics = self._reduce(stats)
        variances = [metrics.pop(f"_{n}_sq") - metrics.pop(f"_{n}") ** 2 for n in ("return", "value_residual")]
        metrics["value_explained_variance"] = 1.0 - variances[1] / variances[0] if variances[0] > 0 else 0.0
        return {**metrics, **critic_metrics}, answers

    def _whiten(self) -> None:
        """Advantages scaled to mean 0, std 1 (`llmhpc.rl.ppo.whiten`'s formula) over every answer token of the
        rollout batch, on every dp rank: the statistics are summed over the ranks, so a run gives the advantages
        of one process whatever its layout."""
        masks = [b["labels"] != IGNORE_INDEX for b in self.batches]
        flat = torch.cat([b["advantages"][m] for b, m in zip(self.batches, masks, strict=True)]).double()
        sums = torch.stack([flat.sum(), torch.tensor(float(flat.numel()), dtype=torch.float64)])
        if self.dp_group is not None:
            dist.all_reduce(sums, group=self.dp_group)
        mean, count = sums[0] / sums[1].clamp(min=1), sums[1]
        squares = ((flat - mean) ** 2).sum()
        if self.dp_group is not None:
            dist.all_reduce(squares, group=self.dp_group)
        scale = torch.rsqrt(squares / (count - 1).clamp(min=1) + 1e-8)
        flat = ((flat - mean) * scale).float()
        at = 0
        for batch, mask in zip(self.batches, masks, strict=True):
            n = int(mask.sum())
            batch["advantages"] = torch.zeros_like(batch["advantages"]).masked_scatter(mask, flat[at:at + n])
            at += n
