"""Recipe: supervised fine-tuning on chat data, full or with LoRA adapters.

    llmhpc sft model.init_from=<HF dir | .gguf | llmhpc run> data.source=<.jsonl | .parquet | dir> [peft=lora]
    llmhpc sft model.init_from=SmolLM2-135M-Instruct.Q4_1.gguf          # the package's arithmetic problems

Conversations (`messages`, or `prompt` / `completion`) are rendered with the model's own chat template, the loss
is on assistant tokens only, and several conversations are packed into a row with attention kept inside each
(`llmhpc.data.sft`). The model, its layout and optimizer come from the shared builder (`peft=lora` wraps the
projections in adapters there and freezes the base, so checkpoints hold only the adapters); the objective is
plain next-token cross-entropy on those labels. Running the same command again resumes from run.dir. With
peft=lora or peft=qlora (the base stored as NF4) the run ends with a peft-format adapter in run.dir/adapter.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from llmhpc.config import Config, ConfigError
from llmhpc.errors import InputError
from llmhpc.parallel import dp_rank, dp_size
from llmhpc.train.builder import RunContext, build, distributed_run
from llmhpc.train.objective import NextTokenObjective
from llmhpc.train.trainer import Trainer, TrainResult, report_done

ARITHMETIC = "arithmetic"
"""data.source naming the package's own word problems (`llmhpc.data.arithmetic`), the default SFT data."""
ARITHMETIC_TRAIN = 2000
"""Training problems written for data.source=arithmetic (none of them in the pool `llmhpc eval` asks from)."""


ARITHMETIC_EVAL = 32
"""Held-out problems answered greedily at each eval of a data.source=arithmetic run (`llmhpc eval
task=arithmetic` asks more, from the same pool)."""
ARITHMETIC_NEW_TOKENS = 128
"""Longest answer decoded for them (the worked answers the task trains are 30-60 tokens)."""


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def arithmetic_or_file(cfg: Config) -> str:
    """data.source, or for 'arithmetic' the package's training problems written once into the cache."""
    if cfg.data.source != ARITHMETIC:
        return cfg.data.source
    from llmhpc.assets import cache_root
    from llmhpc.data.arithmetic import HELD_OUT, training_problems, write_jsonl

    path = cache_root() / "arithmetic" / f"train_seed{cfg.run.seed}_n{ARITHMETIC_TRAIN}_heldout{HELD_OUT}.jsonl"
    if not path.is_file():  # every rank may write it: the write is atomic and the content the same
        write_jsonl(training_problems(ARITHMETIC_TRAIN, cfg.run.seed), path)
    return str(path)


def with_model_tokenizer(cfg: Config) -> Config:
    """The run's config with data.tokenizer set to the model's own, so checkpoints name it for later stages."""
    from llmhpc.models.loader import tokenizer_spec

    if not cfg.model.init_from:
        raise ConfigError("model.init_from is not set: SFT starts from a trained model (an HF directory, a .gguf "
                          "file or an llmhpc run), e.g. model.init_from=runs/pretrain")
    spec = tokenizer_spec(cfg.model.init_from)
    if spec is None:
        raise InputError(f"{cfg.model.init_from}: has no tokenizer files (tokenizer.json); add the model's tokenizer")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=spec))


def run(cfg: Config) -> TrainResult:
    """Fine-tune under the layout of cfg.parallel on WORLD_SIZE processes."""
    cfg = with_model_tokenizer(cfg)
    with distributed_run(cfg) as where:
        return _train(cfg, where)


def _train(cfg: Config, where: RunContext) -> TrainResult:
    from llmhpc.data.sft import SFTLoader, load_sft_examples, sft_eval_batches, split_examples
    from llmhpc.data.tokenizer import load_tokenizer

    if where.dims.pp > 1 and not cfg.data.pack:
        raise ConfigError("data.pack=false gives batches as wide as their longest conversation, but pipeline stages "
                          "exchange fixed shapes; use data.pack=true under parallel.pp > 1")
    built = build(cfg, where)
    cfg, t, d = built.cfg, built.cfg.trainer, built.cfg.data
    tokenizer = load_tokenizer(d.tokenizer)
    examples, report = load_sft_examples(arithmetic_or_file(cfg), tokenizer, t.seq_len, chat_template=d.chat_template,
                                         last_turn_only=d.last_turn_only, on_error=d.on_error)
    if _is_main():
        print(report.summary(), flush=True)
        for problem in report.problems[:10]:
            print(f"  skipped: {problem}", flush=True)
    train, val = split_examples(examples, d.val_fraction, cfg.run.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = where.dims.tp  # sequence parallel splits each row's positions over the tp ranks
    loader = SFTLoader(train, t.seq_len, t.micro_batch_size, cfg.run.seed, pack=d.pack, pad_id=pad,
                       dp_rank=dp_rank(where.mesh), dp_size=dp_size(where.mesh), width_multiple=width)
    held_out = sft_eval_batches(val, t.seq_len, t.micro_batch_size, t.eval_batches, pack=d.pack, pad_id=pad,
                                width_multiple=width) if t.eval_every and val else []
    trainer = Trainer(
        cfg, built.engine, loader, NextTokenObjective(), components=built.components, eval_batches=held_out,
        flops_per_token=built.flops_per_token, lineage=built.lineage, lr_scales=built.lr_scales,
        evaluators=answer_accuracy(cfg, tokenizer, where, ARITHMETIC_EVAL, ARITHMETIC_NEW_TOKENS),
    )
    return fit_and_close(trainer, cfg)


def fit_and_close(trainer: Trainer, cfg: Config) -> TrainResult:
    """Train; under peft, write the adapter in peft's format; release the engine whatever happens."""
    try:
        result = trainer.fit()
        if cfg.peft.name != "none":
            save_adapter(trainer.engine.model, cfg)
        return result
    finally:
        trainer.engine.close()


def answer_accuracy(cfg: Config, tokenizer, where: RunContext, problems: int, max_new_tokens: int) -> list:
    """For data.source=arithmetic: greedy accuracy on `problems` held-out problems at every eval (answers of at
    most `max_new_tokens`).

    Every rank decodes every problem (same inputs, so all ranks take part in each forward's collectives and
    stop together). Decoding needs the KV cache, which neither a pipeline stage (it holds some layers) nor a
    tensor-parallel model (sequence parallel cannot split one new token) has: under parallel.pp > 1 or
    parallel.tp > 1 only the eval loss is kept; `llmhpc eval task=arithmetic` scores the checkpoint afterwards."""
    if (cfg.data.source != ARITHMETIC or not cfg.trainer.eval_every or not problems or where.dims.pp > 1
            or where.dims.tp > 1):
        return []
    from llmhpc.data.arithmetic import held_out_problems
    from llmhpc.scoring.answers import accuracy, question_from_row

    questions = [question_from_row(p.to_row()) for p in held_out_problems(problems, cfg.run.seed)]

    def arithmetic(model) -> dict[str, float]:
        result = accuracy(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=16)
        return {"accuracy": result["accuracy"], "truncated": result["truncated"]}

    return [arithmetic]


def save_adapter(model, cfg: Config) -> None:
    """run.dir/adapter: the adapters in peft's format, loadable onto the HF export of model.init_from."""
    from llmhpc.peft.lora import lora_config, save_peft_adapter

    save_peft_adapter(model, lora_config(model), Path(cfg.run.dir) / "adapter", str(cfg.model.init_from),
                      write=_is_main())


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc sft`: fine-tune, then (rank 0) report where the run ended."""
    return report_done(cfg, run(cfg))
