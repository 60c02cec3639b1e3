"""Recipe: GRPO — reinforcement learning from verifiable rewards, on groups of sampled answers.

    llmhpc grpo model.init_from=<HF dir | .gguf | llmhpc run> [data.source=<.jsonl of prompt/answer>]
                reward=[correct,format:0.1] group_size=8 [peft=lora] [beta=0.04] [dynamic_sampling=true]

For each prompt of a rollout batch, `group_size` answers are sampled from the weights being trained (the rollout
engine, `llmhpc.rl.rollout`), scored by the reward functions, and each answer's advantage is its reward relative
to its group; the clipped policy-ratio objective (`llmhpc.rl.grpo.GRPOObjective`) then takes
`updates_per_rollout` optimizer steps on that batch (`llmhpc.rl.group_rollouts`). The model, its layout and
optimizer come from the shared builder and the loop is the shared trainer, so logging, W&B, checkpoints and the
exact resume are those of every stage. With beta > 0 a reference policy is the starting model: the base with
adapters switched off under peft=lora / qlora, otherwise a frozen copy read from model.init_from.

Layouts: one process, FSDP2 / DDP / HSDP (each rank samples for its own prompts; under FSDP2 the parameters are
gathered once per rollout, not once per token, and the time that takes is logged as gather_seconds). Decoding
needs the KV cache, which a pipeline stage or a tensor-parallel model does not have: parallel.tp and parallel.pp
must be 1.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from llmhpc.config import Config, ConfigError
from llmhpc.config.schema import GRPOConfig, PPOConfig
from llmhpc.errors import InputError
from llmhpc.parallel import dp_rank
from llmhpc.rl.frozen import FROZEN_DTYPES, FrozenModel, ReferencePolicy
from llmhpc.rl.rollout import RolloutEngine
from llmhpc.rl.sampling import SamplingParams
from llmhpc.stages.sft import answer_accuracy, arithmetic_or_file, fit_and_close, with_model_tokenizer
from llmhpc.train.builder import RunContext, build, distributed_run
from llmhpc.train.trainer import Trainer, TrainResult, report_done


def check_sampling_layout(cfg: Config, where: RunContext, per_prompt_key: str, unit: str) -> None:
    """The layout rules of a stage that samples from its policy (grpo, ppo): no tp / pp (decoding needs the KV
    cache), the torch engine, and a rollout batch of whole `unit`s of cfg.<stage>.<per_prompt_key> answers on every
    data-parallel rank."""
    d, t, stage = where.dims, cfg.trainer, cfg.stage
    if d.tp > 1 or d.pp > 1:
        raise ConfigError(f"{stage} samples answers with a KV cache, which tensor-parallel and pipeline layouts do "
                          "not have; use parallel.tp=1 parallel.pp=1 with data parallelism (parallel.dp_shard)")
    if cfg.parallel.engine != "torch":
        raise ConfigError(f"{stage} runs on parallel.engine=torch (one process, FSDP2, DDP or HSDP)")
    size = getattr(getattr(cfg, stage), per_prompt_key)
    if t.global_batch_size % (size * d.dp_size):
        raise ConfigError(f"trainer.global_batch_size={t.global_batch_size} must be a multiple of {stage}."
                          f"{per_prompt_key}={size} x {d.dp_size} data-parallel ranks (each rank samples whole "
                          f"{unit})")


def reward_specs(entries: list[str]) -> dict[str, float]:
    """grpo.reward entries ('correct', 'format:0.1', 'pkg.mod.fn:2') -> {name or path: weight}."""
    specs: dict[str, float] = {}
    for entry in entries:
        name, _, weight = entry.partition(":")
        try:
            specs[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"grpo.reward entry {entry!r}: the weight after ':' must be a number, e.g. "
                              "format:0.1") from None
    return specs


def load_prompts(cfg: Config, tokenizer, max_new_tokens: int) -> list:
    """The prompt set: rows with 'prompt' (or 'messages') and 'answer', rendered with the model's chat template;
    a prompt that leaves no room for the stage's max_new_tokens within trainer.seq_len is refused."""
    from llmhpc.rl.group_rollouts import Prompt
    from llmhpc.scoring.answers import prompt_ids, read_question_rows

    prompts = []
    for question, row in read_question_rows(arithmetic_or_file(cfg)):
        ids = prompt_ids(tokenizer, question)
        room = cfg.trainer.seq_len - max_new_tokens
        if len(ids) > room:
            raise InputError(f"{cfg.data.source}: a prompt of {len(ids)} tokens leaves no room for "
                             f"{cfg.stage}.max_new_tokens={max_new_tokens} in trainer.seq_len="
                             f"{cfg.trainer.seq_len}; raise trainer.seq_len")
        prompts.append(Prompt(tuple(ids), row))
    return prompts


def reference_policy(cfg: Config, policy: nn.Module, device: torch.device,
                     autocast: Callable[[], AbstractContextManager], temperature: float,
                     stage: GRPOConfig | PPOConfig) -> ReferencePolicy:
    """The starting model, for GRPO's KL term and PPO's KL penalty (`llmhpc.rl.frozen.ReferencePolicy`): the base
    with adapters switched off under peft (no second model), otherwise a frozen copy read from model.init_from,
    stored in `stage.frozen_dtype` and, with `stage.offload_frozen`, kept in host memory between rollouts."""
    if cfg.peft.name != "none":
        from llmhpc.peft.lora import adapters_disabled

        return ReferencePolicy(policy, switch=lambda: adapters_disabled(policy), autocast=autocast,
                               temperature=temperature)
    from llmhpc.models import load_pretrained

    model, _ = load_pretrained(cfg.model.init_from)
    frozen = FrozenModel(model, device, dtype=FROZEN_DTYPES[stage.frozen_dtype], offload=stage.offload_frozen)
    return ReferencePolicy(frozen, autocast=autocast, temperature=temperature)


def run(cfg: Config) -> TrainResult:
    """Train with GRPO under the layout of cfg.parallel on WORLD_SIZE processes."""
    cfg = with_model_tokenizer(cfg)
    with distributed_run(cfg) as where:
        check_sampling_layout(cfg, where, "group_size", "groups")
        return _train(cfg, where)


@dataclass
class Sampler:
    """What a stage that samples from its policy needs: the prompts, the rollout engine on the model being trained,
    the sampling settings and the tokenizer's decode."""

    prompts: list
    engine: RolloutEngine
    params: SamplingParams
    decode: Callable[[list[int]], str]
    pad_id: int
    tokenizer: object


def sampler(cfg: Config, model: nn.Module, section) -> Sampler:
    """The Sampler of a stage whose config section (grpo, ppo) holds max_new_tokens, temperature, top_k, top_p and
    rollout_batch_size."""
    from llmhpc.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    eos = tokenizer.eos_token_id

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    engine = RolloutEngine(model, batch_size=section.rollout_batch_size, eos_token_ids=[] if eos is None else [eos],
                           decode=decode)
    params = SamplingParams(max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                            top_k=section.top_k, top_p=section.top_p, seed=cfg.run.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Sampler(load_prompts(cfg, tokenizer, section.max_new_tokens), engine, params, decode, pad_id, tokenizer)


def _train(cfg: Config, where: RunContext) -> TrainResult:
    from llmhpc.rl.group_rollouts import GroupRollouts, GroupSettings
    from llmhpc.rl.grpo import GRPOObjective
    from llmhpc.rl.rewards import RewardSet

    try:
        rewards = RewardSet.from_specs(reward_specs(cfg.grpo.reward))
    except ValueError as e:
        raise ConfigError(f"grpo.reward: {e}") from None
    built = build(cfg, where)
    cfg, t, g = built.cfg, built.cfg.trainer, built.cfg.grpo
    model, engine = built.engine.model, built.engine
    sampling = sampler(cfg, model, g)
    ranks = engine.dp.size
    settings = GroupSettings(
        group_size=g.group_size, sampling=sampling.params, groups=t.global_batch_size // (g.group_size * ranks),
        micro_batches=t.global_batch_size // (t.micro_batch_size * ranks), updates=g.updates_per_rollout,
        scale_rewards=g.scale_rewards, dynamic_sampling=g.dynamic_sampling, max_draws=g.max_draws,
        overlong=g.overlong, overlong_buffer=g.overlong_buffer, pad_id=sampling.pad_id,
        shared_prompt=g.shared_prompt and g.loss_norm == "token" and g.importance == "token",
    )
    source = GroupRollouts(
        sampling.engine, sampling.prompts, rewards, sampling.decode, settings, seed=cfg.run.seed,
        rank=dp_rank(where.mesh), ranks=ranks, dp_group=engine.dp.group, context=engine.autocast,
        reference=(reference_policy(cfg, model, where.device, engine.autocast, g.temperature, g) if g.beta > 0
                   else None),
    )
    objective = GRPOObjective(clip_low=g.clip_low, clip_high=g.clip_high, beta=g.beta, loss_norm=g.loss_norm,
                              importance=g.importance, max_completion_tokens=g.max_new_tokens,
                              temperature=g.temperature)
    trainer = Trainer(
        cfg, engine, source, objective, components=built.components, lineage=built.lineage,
        lr_scales=built.lr_scales,
        evaluators=answer_accuracy(cfg, sampling.tokenizer, where, g.eval_problems, g.max_new_tokens),
    )
    return fit_and_close(trainer, cfg)


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc grpo`: train, then (rank 0) report where the run ended."""
    return report_done(cfg, run(cfg))
