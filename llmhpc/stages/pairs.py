"""Where the pair stages (`llmhpc reward`, `llmhpc dpo`) get their ranked pairs: data.source, or the package's
arithmetic pairs written once into the cache, with a held-out split either way."""

from __future__ import annotations

import os

from llmhpc.config import Config, ConfigError
from llmhpc.data.preference import PreferencePair, load_preference_pairs
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


def load_pairs(cfg: Config, tokenizer, n_train: int, n_eval: int) -> tuple[list[PreferencePair],
                                                                        list[PreferencePair], str]:
    """(train pairs, held-out pairs, the train source) with the data report logged (rank 0). Without a held-out
    source, data.val_fraction of the pairs is held out."""
    from llmhpc.data.sft import split_examples

    d, t = cfg.data, cfg.trainer
    train_source, held_source = pair_sources(cfg, n_train, n_eval)
    train, report = load_preference_pairs(train_source, tokenizer, t.seq_len, chat_template=d.chat_template,
                                          on_error=d.on_error)
    if os.environ.get("RANK", "0") == "0":
        print(report.summary(), flush=True)
        for problem in report.problems[:10]:
            print(f"  skipped: {problem}", flush=True)
    if held_source is not None:
        held, _ = load_preference_pairs(held_source, tokenizer, t.seq_len, chat_template=d.chat_template,
                                        on_error=d.on_error)
    else:
        train, held = split_examples(train, d.val_fraction, cfg.run.seed)
    return train, held, train_source
