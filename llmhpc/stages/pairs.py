"""Where the pair stages (`llmhpc reward`, `llmhpc dpo`) get their ranked pairs: data.source, or the package's
arithmetic pairs written once into the cache, with a held-out split either way; for `llmhpc reward` also pairs
from a policy's own sampled answers (reward_model.sampled_from), sampled once and cached."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from llmhpc.config import Config, ConfigError
from llmhpc.data.preference import PreferencePair, load_preference_pairs
from llmhpc.errors import InputError
from llmhpc.stages.sft import ARITHMETIC
from llmhpc.train.builder import RunContext


def require_data_parallel(cfg: Config, where: RunContext, stage: str) -> None:
    """The pair stages run on one process or under FSDP2 / DDP / HSDP (torch engine), not under tensor or pipeline
    parallelism or DeepSpeed: ConfigError naming the fix otherwise."""
    if where.dims.tp > 1 or where.dims.pp > 1 or cfg.parallel.engine != "torch":
        raise ConfigError(f"{stage} runs on parallel.engine=torch with parallel.tp=1 parallel.pp=1 (one process, "
                          "FSDP2, DDP or HSDP); use data parallelism (parallel.dp_shard)")


def pair_sources(cfg: Config, n_train: int, n_eval: int) -> tuple[str, str | None]:
    """(train source, held-out source or None): data.source, or for 'arithmetic' the package's pairs written once
    into the cache (`n_train` from the training problems, `n_eval` from the held-out pool)."""
    if cfg.data.source != ARITHMETIC:
        return cfg.data.source, None
    from llmhpc.assets import cache_root
    from llmhpc.data.arithmetic import HELD_OUT, held_out_problems, training_problems, write_rows
    from llmhpc.data.arithmetic_preferences import preference_rows

    seed, root = cfg.run.seed, cache_root() / "arithmetic"
    train = root / f"preferences_train_seed{seed}_n{n_train}_heldout{HELD_OUT}.jsonl"
    held = root / f"preferences_heldout_seed{seed}_n{n_eval}.jsonl" if n_eval else None
    if not train.is_file():  # every rank may write: the write is atomic and the content the same
        write_rows(preference_rows(training_problems(n_train, seed), seed), train)
    if held is not None and not held.is_file():
        write_rows(preference_rows(held_out_problems(n_eval, seed), seed + 1), held)
    return str(train), str(held) if held else None


def _fingerprint(policy: Path) -> str:
    """A short key that changes when the policy's files do: its path and the newest modification time of it and
    what lies up to two levels below (an llmhpc run's new checkpoint, a re-exported HF directory)."""
    entries = [policy]
    if policy.is_dir():
        below = list(policy.iterdir())
        entries += below + [p for d in below if d.is_dir() for p in d.iterdir()]
    newest = max(p.stat().st_mtime_ns for p in entries)
    return hashlib.sha1(f"{policy}:{newest}".encode()).hexdigest()[:12]


def sampling_policy(cfg: Config) -> Path:
    """reward_model.sampled_from as a path that exists, with data.source=arithmetic; else a one-line error."""
    if cfg.data.source != ARITHMETIC:
        raise ConfigError(f"reward_model.sampled_from makes pairs from the arithmetic problems, but data.source="
                          f"{cfg.data.source}; set data.source=arithmetic or leave sampled_from empty")
    policy = Path(cfg.reward_model.sampled_from).expanduser().resolve()
    if not policy.exists():
        raise InputError(f"{policy}: reward_model.sampled_from not found; name the policy (HF dir, .gguf or llmhpc "
                         "run) whose answers the reward model should learn to judge")
    return policy


def sampled_pairs_source(cfg: Config) -> str:
    """The JSONL of pairs made from reward_model.sampled_from's own answers (`sampled_pair_rows`) to the
    sampled_problems training problems after the arithmetic_pairs ones. Rank 0 samples them once into the cache,
    keyed by the policy (`_fingerprint`) and every setting that changes them; the other ranks wait for the file."""
    from llmhpc.assets import cache_root
    from llmhpc.data.arithmetic import training_problems, write_rows

    r, seed = cfg.reward_model, cfg.run.seed
    policy = sampling_policy(cfg)
    out = cache_root() / "arithmetic" / (
        f"sampled_pairs_{_fingerprint(policy)}_seed{seed}_after{r.arithmetic_pairs}_n{r.sampled_problems}"
        f"x{r.samples_per_problem}_t{r.sample_temperature:g}.jsonl")
    if os.environ.get("RANK", "0") == "0" and not out.is_file():
        problems = training_problems(r.arithmetic_pairs + r.sampled_problems, seed)[r.arithmetic_pairs:]
        write_rows(_sampled_rows(cfg, policy, problems), out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return str(out)


def _sampled_rows(cfg: Config, policy: Path, problems: list) -> list[dict]:
    """Sample the policy's answers to `problems` and rank them (`sampled_pair_rows`), reporting what it found."""
    from llmhpc.data.arithmetic_preferences import sampled_pair_rows
    from llmhpc.models import load_pretrained
    from llmhpc.scoring.answers import is_right, question_from_row, sampled_replies

    r = cfg.reward_model
    print(f"sampling {r.samples_per_problem} answers to each of {len(problems)} training problems from {policy} "
          f"(temperature {r.sample_temperature:g}; once, then cached)", file=sys.stderr, flush=True)
    model, tokenizer = load_pretrained(policy, dtype=torch.bfloat16 if cfg.precision.name == "bf16" else torch.float32)
    if tokenizer is None:
        raise InputError(f"{policy}: has no tokenizer files, so it cannot be asked the problems; add them")
    questions = [question_from_row(p.to_row()) for p in problems]
    samples = sampled_replies(model, tokenizer, questions, n=r.samples_per_problem,
                              temperature=r.sample_temperature, batch_size=32, seed=cfg.run.seed)
    by_question = {p.question: q for p, q in zip(problems, questions, strict=True)}
    rows = sampled_pair_rows(problems, samples, lambda problem, text: is_right(by_question[problem.question], text))
    right = sum(is_right(q, text) for q, answers in zip(questions, samples, strict=True) for text in answers)
    share = right / (len(problems) * r.samples_per_problem)
    print(f"sampled pairs: {len(rows)} from {len(problems)} problems; {share:.1%} of the samples right, "
          f"{sum(row['flaw'] == 'sampled_none_right' for row in rows)} pairs rank the worked solution (no sample "
          "right)", file=sys.stderr, flush=True)
    return rows


def load_pairs(cfg: Config, tokenizer, n_train: int, n_eval: int, *, also_train: str | None = None,
               ) -> tuple[list[PreferencePair], list[PreferencePair], str]:
    """(train pairs, held-out pairs, the train source) with the data report logged (rank 0); `also_train`: a
    further source of train pairs (e.g. `sampled_pairs_source`). Without a held-out source, data.val_fraction of
    the pairs is held out."""
    from llmhpc.data.sft import split_examples

    d, t = cfg.data, cfg.trainer
    train_source, held_source = pair_sources(cfg, n_train, n_eval)
    train, report = load_preference_pairs(train_source, tokenizer, t.seq_len, chat_template=d.chat_template,
                                          on_error=d.on_error)
    reports = [report]
    if also_train is not None:
        more, more_report = load_preference_pairs(also_train, tokenizer, t.seq_len, chat_template=d.chat_template,
                                                  on_error=d.on_error)
        train = train + more
        reports.append(more_report)
    if os.environ.get("RANK", "0") == "0":
        for each in reports:
            print(each.summary(), flush=True)
            for problem in each.problems[:10]:
                print(f"  skipped: {problem}", flush=True)
    if held_source is not None:
        held, _ = load_preference_pairs(held_source, tokenizer, t.seq_len, chat_template=d.chat_template,
                                        on_error=d.on_error)
    else:
        train, held = split_examples(train, d.val_fraction, cfg.run.seed)
    return train, held, train_source
