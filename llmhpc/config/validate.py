"""Rules a config must satisfy before anything allocates memory.

Types and key names are checked by the schema; this module checks values and the relations
between them, and says which rule failed and how to fix it in one line.
"""

from __future__ import annotations

from llmhpc.config.schema import Config


class ConfigError(ValueError):
    """A config problem, phrased for the user: names the key, the rule and a fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key}={value!r} is not one of: {', '.join(allowed)}")


def _positive(cfg_section: object, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg_section, name)
        _check(value > 0, f"{prefix}.{name} must be > 0, got {value}")


def validate_model(model, prefix: str = "model") -> None:
    """Shape rules of a Llama model config."""
    _positive(model, prefix, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"))
    if model.head_dim is None:
        _check(
            model.dim % model.n_heads == 0,
            f"{prefix}.n_heads={model.n_heads} does not divide {prefix}.dim={model.dim}; "
            f"pick a divisor of {model.dim} or set {prefix}.head_dim",
        )
    _check(
        model.n_heads % model.n_kv_heads == 0,
        f"{prefix}.n_kv_heads={model.n_kv_heads} does not divide {prefix}.n_heads={model.n_heads} "
        "(grouped-query attention shares each KV head among n_heads/n_kv_heads query heads)",
    )
    _check(model.norm_eps > 0, f"{prefix}.norm_eps must be > 0, got {model.norm_eps}")
    _check(model.rope_theta > 0, f"{prefix}.rope_theta must be > 0, got {model.rope_theta}")
    rs = model.rope_scaling
    _choice(f"{prefix}.rope_scaling.type", rs.type, ("none", "llama3"))
    if rs.type == "llama3":
        _check(rs.factor >= 1, f"{prefix}.rope_scaling.factor must be >= 1, got {rs.factor}")
        _check(
            rs.high_freq_factor > rs.low_freq_factor,
            f"{prefix}.rope_scaling.high_freq_factor ({rs.high_freq_factor}) must exceed "
            f"low_freq_factor ({rs.low_freq_factor})",
        )


def validate_grpo(cfg: Config) -> None:
    """Rules of the grpo section (checked for every stage: its defaults always hold)."""
    g = cfg.grpo
    _positive(g, "grpo", ("max_new_tokens", "updates_per_rollout", "max_draws", "rollout_batch_size"))
    _check(g.group_size >= 2, f"grpo.group_size={g.group_size}: advantages compare answers within a group; use >= 2")
    _check(g.temperature >= 0, f"grpo.temperature must be >= 0, got {g.temperature}")
    _check(0 < g.top_p <= 1, f"grpo.top_p must be in (0, 1], got {g.top_p}")
    _check(g.top_k >= 0, f"grpo.top_k must be >= 0 (0: no top-k), got {g.top_k}")
    _check(g.clip_low >= 0 and g.clip_high >= 0, f"grpo.clip_low / clip_high must be >= 0, got {g.clip_low} / "
                                                 f"{g.clip_high}")
    _check(g.beta >= 0, f"grpo.beta must be >= 0 (0: no reference model), got {g.beta}")
    _choice("grpo.loss_norm", g.loss_norm, ("token", "sequence", "fixed"))
    _choice("grpo.frozen_dtype", g.frozen_dtype, ("fp32", "bf16"))
    _choice("grpo.importance", g.importance, ("token", "sequence"))
    _choice("grpo.overlong", g.overlong, ("none", "mask", "penalty"))
    _check(0 < g.overlong_buffer <= g.max_new_tokens or g.overlong != "penalty",
           f"grpo.overlong_buffer={g.overlong_buffer} must be in (0, grpo.max_new_tokens={g.max_new_tokens}]")
    _check(bool(g.reward), "grpo.reward is empty; name at least one reward, e.g. grpo.reward=[correct]")
    _check(g.eval_problems >= 0, f"grpo.eval_problems must be >= 0, got {g.eval_problems}")
    _whole_rollouts(cfg, "grpo", "group_size", "groups")


def _whole_rollouts(cfg: Config, stage: str, key: str, what: str) -> None:
    """For the stage that runs: a rollout batch (trainer.global_batch_size answers) is made of whole `what`, each
    of cfg.<stage>.<key> answers."""
    if cfg.stage != stage:
        return
    batch, size = cfg.trainer.global_batch_size, getattr(getattr(cfg, stage), key)
    _check(batch % size == 0, f"trainer.global_batch_size={batch} must be a multiple of {stage}.{key}={size} (a "
                              f"rollout batch is whole {what}), e.g. {size * max(1, batch // size)}")


def validate_ppo(cfg: Config) -> None:
    """Rules of the ppo section (checked for every stage: its defaults always hold)."""
    p = cfg.ppo
    _positive(p, "ppo", ("max_new_tokens", "updates_per_rollout", "rollout_batch_size", "samples_per_prompt",
                         "critic_lr", "kl_horizon"))
    _check(p.temperature >= 0, f"ppo.temperature must be >= 0, got {p.temperature}")
    _check(0 < p.top_p <= 1, f"ppo.top_p must be in (0, 1], got {p.top_p}")
    _check(p.top_k >= 0, f"ppo.top_k must be >= 0 (0: no top-k), got {p.top_k}")
    _check(p.clip > 0 and p.value_clip > 0, f"ppo.clip / value_clip must be > 0, got {p.clip} / {p.value_clip}")
    _check(0 <= p.gamma <= 1 and 0 <= p.lam <= 1, f"ppo.gamma / lam must be in [0, 1], got {p.gamma} / {p.lam}")
    _check(p.kl_coef >= 0, f"ppo.kl_coef must be >= 0 (0: no reference model), got {p.kl_coef}")
    _choice("ppo.frozen_dtype", p.frozen_dtype, ("fp32", "bf16"))
    _check(p.kl_target is None or p.kl_target > 0, f"ppo.kl_target must be > 0 (or null: fixed), got {p.kl_target}")
    _check(bool(p.reward) or bool(p.reward_model_path),
           "ppo has no reward: name reward functions (ppo.reward=[correct]) or a reward model "
           "(ppo.reward_model_path=...)")
    _check(p.reward_model_weight > 0, f"ppo.reward_model_weight must be > 0 (without a reward model leave "
           f"reward_model_path unset), got {p.reward_model_weight}")
    _check(p.eval_problems >= 0, f"ppo.eval_problems must be >= 0, got {p.eval_problems}")
    _check(p.critic_warmup >= 0, f"ppo.critic_warmup must be >= 0 (0: none), got {p.critic_warmup}")
    _check(not p.group_baseline or p.samples_per_prompt > 1,
           "ppo.group_baseline=true needs ppo.samples_per_prompt > 1 (a mean over one answer leaves every score 0)")
    _whole_rollouts(cfg, "ppo", "samples_per_prompt", "prompts")


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")


def validate_dpo(cfg: Config) -> None:
    """Rules of the dpo section (checked for every stage: its defaults always hold)."""
    d = cfg.dpo
    _choice("dpo.loss", d.loss, DPO_LOSSES)
    _check(d.beta > 0, f"dpo.beta must be > 0, got {d.beta}")
    _check(0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    _check(d.eval_pairs >= 0, f"dpo.eval_pairs must be >= 0, got {d.eval_pairs}")
    _check(d.arithmetic_pairs > 0, f"dpo.arithmetic_pairs must be > 0, got {d.arithmetic_pairs}")


def validate_reward(cfg: Config) -> None:
    """Rules of the reward_model section (checked for every stage: its defaults always hold)."""
    r = cfg.reward_model
    _choice("reward_model.pooling", r.pooling, ("last", "sum"))
    _check(r.center_coefficient >= 0, f"reward_model.center_coefficient must be >= 0, got {r.center_coefficient}")
    _check(r.eval_pairs >= 0, f"reward_model.eval_pairs must be >= 0, got {r.eval_pairs}")
    _check(r.arithmetic_pairs > 0, f"reward_model.arithmetic_pairs must be > 0, got {r.arithmetic_pairs}")
    _check(r.sampled_problems > 0, f"reward_model.sampled_problems must be > 0, got {r.sampled_problems}")
    _check(r.samples_per_problem >= 2,
           f"reward_model.samples_per_problem must be >= 2 (a pair needs two answers), got {r.samples_per_problem}")
    _check(r.sample_temperature > 0, f"reward_model.sample_temperature must be > 0 (answers are sampled), got "
           f"{r.sample_temperature}")


CONVERT_QUANT = {"hf": ("none",), "trtllm": ("none", "int8_wo", "int4_wo", "fp8"),
                 "gguf": ("none", "q8_0", "q4_0", "q4_k")}
"""The quantizations each `llmhpc convert to=...` format writes."""


def validate_convert(c) -> None:
    """Values of `llmhpc convert`'s options (src / dst are checked when the command runs)."""
    _choice("to", c.to, tuple(CONVERT_QUANT))
    _choice("dtype", c.dtype, ("auto", "float32", "float16", "bfloat16"))
    _check(c.quant in CONVERT_QUANT[c.to],
           f"quant={c.quant!r} is not written for to={c.to}; choose one of: {', '.join(CONVERT_QUANT[c.to])}")
    _positive(c, "convert", ("tp", "pp", "shard_size_gb", "max_batch_size", "max_input_len", "max_seq_len"))


EVAL_TASKS = ("perplexity", "arithmetic", "preferences")
"""The built-in tasks of `llmhpc eval`; a .jsonl path of prompt / answer rows is a task too."""


def validate_eval(e) -> None:
    """Values of `llmhpc eval`'s options (model and file paths are checked when the command runs)."""
    for task in e.task.split(","):
        _check(task.strip() in EVAL_TASKS or task.strip().endswith(".jsonl"),
               f"task={task.strip()!r} is not a task: choose {', '.join(EVAL_TASKS)} or a .jsonl file of prompt / "
               "answer rows (several joined by commas)")
    _positive(e, "eval", ("seq_len", "max_new_tokens", "batch_size", "best_of"))
    _check(e.best_of == 1 or e.judge, f"best_of={e.best_of} needs judge=<an llmhpc reward run> (the reward model) to "
           "pick among the samples")
    _check(e.best_of == 1 or e.temperature > 0, "best_of > 1 samples: temperature must be > 0")
    for name in ("max_windows", "problems"):
        _check(getattr(e, name) >= 0, f"{name} must be >= 0 (0: all), got {getattr(e, name)}")


def validate(cfg: Config) -> None:
    """Raise `ConfigError` on the first rule the config's values break.

    The parallel layout is checked separately, when the world size is known (`llmhpc.config.layout`, at a
    launch), not here: a checkpoint saved under one layout must stay readable under any other.
    """
    validate_model(cfg.model)
    t = cfg.trainer
    _positive(t, "trainer", ("max_steps", "global_batch_size", "seq_len", "lr"))
    if t.micro_batch_size is not None:  # None: derived from the global batch and the layout at launch
        _positive(t, "trainer", ("micro_batch_size",))
        _check(
            t.global_batch_size % t.micro_batch_size == 0,
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size={t.micro_batch_size}; e.g. trainer.global_batch_size="
            f"{max(1, round(t.global_batch_size / t.micro_batch_size)) * t.micro_batch_size}",
        )
    _check(
        t.seq_len <= cfg.model.max_seq_len,
        f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}",
    )
    _choice("trainer.schedule", t.schedule, ("cosine", "wsd", "constant"))
    _check(0 <= t.min_lr_ratio <= 1, f"trainer.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _check(0 <= t.decay_fraction <= 1, f"trainer.decay_fraction must be in [0, 1], got {t.decay_fraction}")
    _check(t.warmup_steps >= 0, f"trainer.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.grad_clip >= 0, f"trainer.grad_clip must be >= 0 (0 disables clipping), got {t.grad_clip}")
    _check(t.keep_last >= 1, f"trainer.keep_last must be >= 1, got {t.keep_last}")
    _check(t.max_bad_steps >= 1, f"trainer.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    for name in ("ckpt_every", "eval_every", "eval_batches", "log_every"):
        _check(getattr(t, name) >= 0, f"trainer.{name} must be >= 0, got {getattr(t, name)}")
    _check(cfg.data.source != "", "data.source must be set: a file or directory of text, e.g. data.source=corpus.jsonl")
    _check(0 <= cfg.data.val_fraction < 0.5, f"data.val_fraction must be in [0, 0.5), got {cfg.data.val_fraction}")
    _choice("data.sampling", cfg.data.sampling, ("shuffle", "random"))
    _choice("data.on_error", cfg.data.on_error, ("skip", "fail"))
    _choice("run.device", cfg.run.device, ("auto", "cpu", "cuda"))
    _choice("logger.wandb.mode", cfg.logger.wandb.mode, ("online", "offline", "disabled"))
    _choice("precision", cfg.precision.name, ("fp32", "bf16", "fp8"))
    _choice("precision.fp8_recipe", cfg.precision.fp8_recipe, ("tensorwise", "rowwise"))
    validate_convert(cfg.convert)
    validate_eval(cfg.eval)
    validate_grpo(cfg)
    validate_ppo(cfg)
    validate_dpo(cfg)
    validate_reward(cfg)
    _choice("peft", cfg.peft.name, ("none", "lora", "qlora"))
    _positive(cfg.peft, "peft", ("rank", "alpha"))
    _check(0 <= cfg.peft.dropout < 1, f"peft.dropout must be in [0, 1), got {cfg.peft.dropout}")
    bad = [t for t in cfg.peft.targets if t not in ("q", "k", "v", "o", "gate", "up", "down")]
    _check(not bad and bool(cfg.peft.targets),
           f"peft.targets {bad or '[]'} not understood; choose from q, k, v, o, gate, up, down")
    _check(
        cfg.precision.name != "fp8" or cfg.parallel.engine == "torch",
        "precision=fp8 is not supported with parallel.engine=deepspeed; use parallel.engine=torch (FSDP2)",
    )
