"""The table of `llmhpc <command>`s: what each one reads from the config, its defaults and its entry point.

Adding a stage is one entry here plus its recipe module; the CLI dispatches through this table and never
grows an `if` per command. The table is plain data (entry points are import strings), so that composing
and checking a config, and `llmhpc <stage> --help`, import nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields

from llmhpc.config.schema import Config

TRAINING_SECTIONS = ("run", "model", "data", "trainer", "parallel", "precision", "logger")
"""What every training stage reads: the run, the model and its data, the loop, the layout, precision and logging."""


@dataclass(frozen=True)
class StageSpec:
    """One command of the CLI."""

    name: str
    """The command, e.g. 'pretrain' (two words for 'data prepare')."""
    summary: str
    """One line for `llmhpc --help`."""
    entry: str
    """'module:function' called with (cfg, overrides); returns the process exit code."""
    sections: tuple[str, ...] = TRAINING_SECTIONS
    """Config sections the command reads; an override of any other section is refused, naming its readers."""
    defaults: tuple[str, ...] = ()
    """Overrides applied before the user's (a key the user sets replaces the default of the same key)."""
    check_layout: bool = True
    """Check the parallel layout against this process's WORLD_SIZE (False: the command lays out other machines)."""
    shorthand: str | None = None
    """A section whose keys the command takes without its prefix (`llmhpc convert src=...` is `convert.src=...`)."""
    example: str = ""
    """A typical command line, shown in `llmhpc --help`."""
    raw: bool = False
    """The command composes its configs itself from its words (`llmhpc submit STAGE ...`); it gets cfg=None."""

    def run(self, cfg: Config | None, overrides: list[str]) -> int:
        module, function = self.entry.split(":")
        entry: Callable[[Config | None, list[str]], int] = getattr(importlib.import_module(module), function)
        return entry(cfg, overrides)


BENCH_DEFAULTS = ("model=smollm2_135m", "trainer.micro_batch_size=4",
                  "trainer.seq_len=256", "trainer.max_steps=4", "trainer.lr=1e-4", "parallel.compile=true")
"""What `llmhpc bench` runs unless told otherwise: the SmolLM2-135M shape, batch 4 x 256, compiled. The
learning rate is pinned (not inherited from the pretraining default): a larger one makes the first steps
spike and amplifies rounding differences between any two implementations past the equal-loss tolerance."""

SFT_DEFAULTS = ("data.source=arithmetic", "trainer.lr=2e-5", "trainer.weight_decay=0.0", "trainer.warmup_steps=10",
                "trainer.max_steps=200", "trainer.seq_len=512", "trainer.global_batch_size=16",
                "data.val_fraction=0.05")
"""What `llmhpc sft` runs unless told otherwise: the package's arithmetic problems, a fine-tuning learning rate
(2e-5, no weight decay, as TRL's SFTTrainer; with peft=lora raise it to ~2e-4) and 512-token packed rows."""

GRPO_DEFAULTS = ("data.source=arithmetic", "trainer.lr=5e-6", "trainer.weight_decay=0.0", "trainer.warmup_steps=0",
                 "trainer.schedule=constant", "trainer.max_steps=100", "trainer.seq_len=512",
                 "trainer.global_batch_size=32", "trainer.micro_batch_size=8", "trainer.eval_every=10",
                 "trainer.ckpt_every=10")
"""What `llmhpc grpo` runs unless told otherwise: the package's arithmetic problems, 4 prompts x 8 answers per
step in micro-batches of 8 answers, a constant learning rate of 5e-6 (full fine-tuning of a small model right
after SFT; TRL's GRPOTrainer defaults to 1e-6), held-out accuracy every 10 steps."""

PPO_DEFAULTS = ("data.source=arithmetic", "trainer.lr=3e-6", "trainer.weight_decay=0.0", "trainer.warmup_steps=0",
                "trainer.schedule=constant", "trainer.max_steps=100", "trainer.seq_len=512",
                "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "trainer.eval_every=10",
                "trainer.ckpt_every=10")
"""What `llmhpc ppo` runs unless told otherwise: the package's arithmetic problems, 16 answers per rollout in
micro-batches of 8, a constant actor learning rate of 3e-6 (the critic's is ppo.critic_lr), held-out accuracy every
10 steps."""

DPO_DEFAULTS = ("data.source=arithmetic", "trainer.lr=5e-6", "trainer.weight_decay=0.0", "trainer.warmup_steps=5",
                "trainer.max_steps=100", "trainer.seq_len=256", "trainer.global_batch_size=8",
                "trainer.micro_batch_size=4", "trainer.eval_every=20", "trainer.ckpt_every=20",
                "data.val_fraction=0.05")
"""What `llmhpc dpo` runs unless told otherwise: the package's arithmetic preference pairs (a right worked answer
over a flawed one), 8 pairs per step in micro-batches of 4, a full fine-tuning learning rate of 5e-6 (TRL's
DPOTrainer defaults to 1e-6 for larger models; with peft=lora raise it to ~5e-5)."""

REWARD_DEFAULTS = ("data.source=arithmetic", "model.score_head=true", "trainer.lr=1e-5",
                   "trainer.weight_decay=0.0", "trainer.warmup_steps=5", "trainer.max_steps=100",
                   "trainer.seq_len=256", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
                   "trainer.eval_every=20", "trainer.ckpt_every=20", "data.val_fraction=0.05")
"""What `llmhpc reward` runs unless told otherwise: the package's arithmetic preference pairs, a scalar head on the
model, 8 pairs per step in micro-batches of 4 and a full fine-tuning learning rate of 1e-5 (with peft=lora raise it
to ~1e-4)."""

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "pretrain", "pretrain a model on a token corpus (resumes from run.dir automatically)",
            "llmhpc.stages.pretrain:main",
            example="llmhpc pretrain model=tiny trainer.max_steps=50 trainer.lr=3e-4 run.dir=runs/x",
        ),
        StageSpec(
            "sft", "supervised fine-tuning on chat data (messages or prompt/completion), full or peft=lora",
            "llmhpc.stages.sft:main", sections=(*TRAINING_SECTIONS, "peft"), defaults=SFT_DEFAULTS,
            example="llmhpc sft model.init_from=model.gguf data.source=chats.jsonl peft=lora trainer.lr=2e-4 "
                    "run.dir=runs/sft",
        ),
        StageSpec(
            "grpo", "GRPO on verifiable rewards: groups of sampled answers scored by reward functions (e.g. the "
            "final number is right), clipped policy-ratio updates; full or peft=lora",
            "llmhpc.stages.grpo:main", sections=(*TRAINING_SECTIONS, "peft", "grpo"), defaults=GRPO_DEFAULTS,
            shorthand="grpo",
            example="llmhpc grpo model.init_from=runs/sft reward=[correct,format:0.1] group_size=8 run.dir=runs/grpo",
        ),
        StageSpec(
            "ppo", "RLHF with PPO: sampled answers scored by a reward model and / or reward functions, a KL penalty "
            "to the starting model, GAE over a critic's values, clipped policy and value updates; full or peft=lora",
            "llmhpc.stages.ppo:main", sections=(*TRAINING_SECTIONS, "peft", "ppo"), defaults=PPO_DEFAULTS,
            shorthand="ppo",
            example="llmhpc ppo model.init_from=runs/sft reward_model_path=runs/rm reward=[] kl_coef=0.05 "
                    "run.dir=runs/ppo",
        ),
        StageSpec(
            "reward", "reward model from ranked pairs (prompt / chosen / rejected): a scalar head trained with the "
            "Bradley-Terry loss (optional margin and centering), held-out pairwise accuracy; full or peft=lora",
            "llmhpc.stages.reward:main", sections=(*TRAINING_SECTIONS, "peft", "reward_model"),
            defaults=REWARD_DEFAULTS, shorthand="reward_model",
            example="llmhpc reward model.init_from=runs/sft data.source=pairs.jsonl run.dir=runs/rm",
        ),
        StageSpec(
            "dpo", "DPO from ranked pairs (prompt / chosen / rejected) against a frozen reference whose log-probs "
            "are computed once and cached; loss=sigmoid|ipo|hinge|simpo; full or peft=lora",
            "llmhpc.stages.dpo:main", sections=(*TRAINING_SECTIONS, "peft", "dpo"), defaults=DPO_DEFAULTS,
            shorthand="dpo",
            example="llmhpc dpo model.init_from=runs/sft data.source=pairs.jsonl beta=0.1 run.dir=runs/dpo",
        ),
        StageSpec(
            "data prepare", "tokenize data.source into packed token shards (data.path)",
            "llmhpc.stages.prepare:main", sections=("run", "data"), check_layout=False,
            example="llmhpc data prepare data.source=corpus.jsonl data.path=data/corpus",
        ),
        StageSpec(
            "bench", "train-step tokens/s vs transformers eager + compiled (default: SmolLM2-135M, 4x256)",
            "llmhpc.stages.bench:main", defaults=BENCH_DEFAULTS,
            example="llmhpc bench precision=bf16      results go to docs/benchmarks.md and run.dir/bench.json",
        ),
        StageSpec(
            "convert", "export a run, checkpoint (any layout), HF dir or .gguf to hf | trtllm (+ engine) | gguf",
            "llmhpc.stages.convert:main", sections=("convert",), check_layout=False, shorthand="convert",
            example="llmhpc convert src=runs/x to=gguf quant=q8_0 dst=exports/x-q8_0.gguf",
        ),
        StageSpec(
            "eval", "perplexity on held-out text and greedy answer accuracy of a model (optionally beside a baseline)",
            "llmhpc.stages.eval:main", sections=("run", "model", "data", "precision", "eval"), check_layout=False,
            shorthand="eval",
            example="llmhpc eval model.init_from=exports/x-q4_k.gguf baseline=exports/x-f16.gguf "
                    "task=perplexity,arithmetic",
        ),
        StageSpec(
            "submit", "run a stage as a Slurm job: its config checked (layout, planner memory on GPUs), an sbatch "
            "script rendered from cluster.* into run.dir/slurm, sbatch called (--dry-run: print it)",
            "llmhpc.stages.submit:main", sections=("cluster",), check_layout=False, raw=True,
            example="llmhpc submit pretrain model=llama3_8b parallel.tp=8 cluster=h100_8x8 cluster.partition=gpu "
                    "run.dir=runs/x",
        ),
        StageSpec(
            "plan", "GPU-free planner: is a layout valid, memory per GPU, step time, tokens/s, MFU (no parallel.dp_*/"
            "tp/pp given: ranks the fastest layouts that fit)",
            "llmhpc.stages.plan:main", sections=("model", "trainer", "parallel", "precision", "cluster", "plan"),
            check_layout=False,
            example="llmhpc plan model=llama3_70b cluster=h100_8x8 trainer.seq_len=8192 "
                    "trainer.global_batch_size=128 precision=bf16",
        ),
    )
}


def section_readers() -> dict[str, list[str]]:
    """{config section: the commands that read it}, for the error that refuses a key of another command."""
    readers: dict[str, list[str]] = {}
    for spec in STAGES.values():
        for section in spec.sections:
            readers.setdefault(section, []).append(spec.name)
    return readers


def with_defaults(spec: StageSpec, overrides: list[str]) -> list[str]:
    """The stage's defaults, except keys the user set, followed by the user's overrides (shorthands expanded)."""
    overrides = [_expand(spec, o) for o in overrides]
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [d for d in spec.defaults if d.split("=", 1)[0] not in given] + list(overrides)


def _expand(spec: StageSpec, override: str) -> str:
    """`key=value` → `<shorthand section>.key=value` for the command's own undotted keys.

    A preset choice (`precision=bf16`, `model=smollm2_135m`) stays as it is: a top-level key of the config is
    never a shorthand (an unknown undotted key is expanded, so its error lists the command's own keys). A value
    with commas (`task=perplexity,arithmetic`) is quoted, so Hydra reads one string, not a sweep.
    """
    key, _, value = override.partition("=")
    if spec.shorthand and "=" in override and "." not in key and not key.startswith(("+", "~")):
        if key not in _TOP_LEVEL:
            if "," in value and value[:1] not in ("'", '"', "[", "{") and "'" not in value:
                value = f"'{value}'"
            return f"{spec.shorthand}.{key}={value}"
    return override


_TOP_LEVEL = frozenset(f.name for f in fields(Config))


def load_stage_config(name: str, overrides: list[str], check_layout: bool = True) -> Config:
    """The validated config of command `name` (its defaults, then `overrides`); `ConfigError` in one line.
    `check_layout=False` leaves the layout unchecked (a job checks it against its own world size)."""
    from llmhpc.config.load import load_config

    spec = STAGES[name]
    return load_config(name, with_defaults(spec, overrides), sections=spec.sections, owners=section_readers(),
                       check_layout=spec.check_layout and check_layout)
