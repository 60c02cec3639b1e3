"""Recipe: PPO — RLHF with a critic: sampled answers, a reward (model or functions), a KL penalty, GAE.

    llmhpc ppo model.init_from=<policy: HF dir | .gguf | llmhpc run> [reward_model_path=runs/rm] [reward=[correct]]
               [critic_from=...] [kl_coef=0.05 | kl_target=6] [updates_per_rollout=2] [peft=lora]

Each rollout samples answers from the weights being trained (the rollout engine, as GRPO), scores them, and
`llmhpc.rl.ppo_rollouts.PPORollouts` turns them into per-token advantages: rewards are -kl_coef x the KL estimate
of each sampled token to the reference (the starting model: the adapter-disabled base under peft, else a frozen
copy) plus the score on the answer's last token, and GAE runs over the critic's values. The actor (the policy)
trains with the clipped ratio objective, one advantage per token; the critic (a model with a value head, started
from the reward model by default) with the clipped value loss, `updates_per_rollout` steps each per rollout.

Both are built by the shared builder and are the two components of every checkpoint ('model': the actor, what
`llmhpc convert` and `model.init_from` read; 'critic'), so a run resumes exactly. The loop, logging, W&B and
evals are the shared trainer's. Layouts: as grpo (one process, FSDP2 / DDP / HSDP; tp and pp must be 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from llmhpc.config import Config, ConfigError
from llmhpc.config.schema import PeftConfig
from llmhpc.parallel import dp_rank
from llmhpc.rl.frozen import FROZEN_DTYPES
from llmhpc.stages.grpo import check_sampling_layout, reference_policy, reward_specs, sampler
from llmhpc.stages.sft import answer_accuracy, fit_and_close, with_model_tokenizer
from llmhpc.train.builder import RunContext, build, distributed_run
from llmhpc.train.trainer import Trainer, TrainResult, report_done


class PPORewards:
    """The reward of an answer: the weighted reward functions' sum plus, with a reward model, `weight` times its
    score of the answer to the row's prompt (the `RewardSet` interface the rollout source calls; the per-function
    columns hold the unweighted values)."""

    def __init__(self, functions, scorer, weight: float = 1.0) -> None:
        self.set, self.scorer, self.weight = functions, scorer, weight
        self.functions = [*(functions.functions if functions else []), *(["reward_model"] if scorer else [])]

    def score(self, completions: Sequence[str], examples: Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
        columns, total = [], torch.zeros(len(completions), dtype=torch.float64)
        if self.set is not None:
            total, per = self.set.score(completions, examples)
            columns.append(per)
        if self.scorer is not None:
            prompts = [row["messages"] if "messages" in row else str(row["prompt"]) for row in examples]
            scores = torch.tensor(self.scorer(prompts, completions), dtype=torch.float64)
            total = total + self.weight * scores
            columns.append(scores[:, None])
        return total, torch.cat(columns, dim=1)


def critic_config(cfg: Config) -> Config:
    """The critic's build config: from ppo.critic_from (default: the reward model, else the policy's source) with a
    value head (kept from a reward model, new otherwise), fully trained at ppo.critic_lr, no adapters."""
    p = cfg.ppo
    source = p.critic_from or p.reward_model_path or cfg.model.init_from
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, init_from=source, score_head=True),
        trainer=dataclasses.replace(cfg.trainer, lr=p.critic_lr, freeze=[]),
        peft=PeftConfig(),
    )


def run(cfg: Config) -> TrainResult:
    """Train with PPO under the layout of cfg.parallel on WORLD_SIZE processes."""
    cfg = with_model_tokenizer(cfg)
    with distributed_run(cfg) as where:
        check_sampling_layout(cfg, where, "samples_per_prompt", "prompts")
        return _train(cfg, where)


def _rewards(cfg: Config, device: torch.device) -> PPORewards:
    from llmhpc.rl.rewards import RewardSet

    functions = None
    if cfg.ppo.reward:
        try:
            functions = RewardSet.from_specs(reward_specs(cfg.ppo.reward))
        except ValueError as e:
            raise ConfigError(f"ppo.reward: {e}") from None
    scorer = None
    if cfg.ppo.reward_model_path:
        from llmhpc.rl.reward_model import RewardScorer

        scorer = RewardScorer.load(cfg.ppo.reward_model_path, device=str(device),
                                   dtype=FROZEN_DTYPES[cfg.ppo.frozen_dtype], offload=cfg.ppo.offload_frozen)
    return PPORewards(functions, scorer, cfg.ppo.reward_model_weight)


def _train(cfg: Config, where: RunContext) -> TrainResult:
    from llmhpc.rl.group_rollouts import GroupSettings
    from llmhpc.rl.grpo import GRPOObjective
    from llmhpc.rl.ppo import KLController
    from llmhpc.rl.ppo_rollouts import AdvantageSettings, Critic, PPORollouts

    rewards = _rewards(cfg, where.device)
    built = build(cfg, where)
    critic = build(critic_config(cfg), where)
    cfg, t, p = built.cfg, built.cfg.trainer, built.cfg.ppo
    model, engine = built.engine.model, built.engine
    sampling = sampler(cfg, model, p)
    ranks = engine.dp.size
    settings = GroupSettings(
        group_size=p.samples_per_prompt, sampling=sampling.params,
        groups=t.global_batch_size // (p.samples_per_prompt * ranks),
        micro_batches=t.global_batch_size // (t.micro_batch_size * ranks), updates=p.updates_per_rollout,
        pad_id=sampling.pad_id, shared_prompt=p.shared_prompt and p.samples_per_prompt > 1,
    )
    reference = (reference_policy(cfg, model, where.device, engine.autocast, p.temperature, p)
                 if p.kl_coef > 0 or p.kl_target is not None else None)

    source = PPORollouts(
        sampling.engine, sampling.prompts, rewards, sampling.decode, settings, seed=cfg.run.seed,
        rank=dp_rank(where.mesh), ranks=ranks, reference=reference, dp_group=engine.dp.group, context=engine.autocast,
        critic=Critic(critic.engine, lr=p.critic_lr, grad_clip=t.grad_clip, value_clip=p.value_clip),
        kl=KLController(p.kl_coef, p.kl_target, p.kl_horizon),
        advantage=AdvantageSettings(gamma=p.gamma, lam=p.lam, whiten=p.whiten_advantages,
                                    group_baseline=p.group_baseline),
        critic_warmup=p.critic_warmup,
    )
    objective = GRPOObjective(clip_low=p.clip, clip_high=p.clip, loss_norm="token",
                              max_completion_tokens=p.max_new_tokens, temperature=p.temperature)
    critic_component = dataclasses.replace(critic.components[0], name="critic")
    trainer = Trainer(
        cfg, engine, source, objective, components=[*built.components, critic_component], lineage=built.lineage,
        lr_scales=built.lr_scales,
        evaluators=answer_accuracy(cfg, sampling.tokenizer, where, p.eval_problems, p.max_new_tokens),
    )
    try:
        return fit_and_close(trainer, cfg)
    finally:
        critic.engine.close()


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc ppo`: train, then (rank 0) report where the run ended."""
    return report_done(cfg, run(cfg))
