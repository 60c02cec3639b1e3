"""Recipe: pretrain a Llama-family model on a packed token corpus.

    llmhpc pretrain model=tiny trainer.max_steps=50 trainer.lr=3e-4 run.dir=runs/x

Builds the model (fresh, or from `model.init_from`) on the run's layout with the shared builder, prepares
(or reuses) the token shards, and trains next-token prediction with the shared `Trainer`. Running the same
command again resumes from the newest complete checkpoint in `run.dir`, under the same or any other layout.
Several processes: `torchrun --nproc-per-node N -m llmhpc pretrain ...`.
"""

from __future__ import annotations

from llmhpc.config import Config, ConfigError
from llmhpc.data.prepare import prepare_on_rank0
from llmhpc.data.pretrain import PackedTokens, PretrainLoader, RandomWindowLoader, eval_batches
from llmhpc.data.tokenizer import load_tokenizer
from llmhpc.parallel import dp_rank, dp_size
from llmhpc.train.builder import RunContext, build, distributed_run
from llmhpc.train.objective import NextTokenObjective
from llmhpc.train.trainer import Trainer, TrainResult, report_done


def run(cfg: Config) -> TrainResult:
    """Train under the layout of cfg.parallel on WORLD_SIZE processes (joining and leaving the process group)."""
    with distributed_run(cfg) as where:
        return _train(cfg, where)  # its locals (the engine) are gone before the process group is


def _train(cfg: Config, where: RunContext) -> TrainResult:
    built = build(cfg, where)
    cfg, t = built.cfg, built.cfg.trainer
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
            f"set model.vocab_size={len(tokenizer)}"
        )
    data_dir = prepare_on_rank0(cfg.data, cfg.run.seed)
    train = PackedTokens(data_dir, "train")
    if cfg.data.sampling == "random":
        loader = RandomWindowLoader(train, t.seq_len, t.micro_batch_size, cfg.run.seed, cfg.data.document_masking,
                                    dp_rank=dp_rank(where.mesh))
    else:
        loader = PretrainLoader(train, t.seq_len, t.micro_batch_size, cfg.run.seed, cfg.data.document_masking,
                                dp_rank=dp_rank(where.mesh), dp_size=dp_size(where.mesh))
    held_out = []
    if t.eval_every and cfg.data.val_fraction > 0:
        held_out = eval_batches(PackedTokens(data_dir, "val"), t.seq_len, t.micro_batch_size, t.eval_batches)
    trainer = Trainer(
        cfg, built.engine, loader, NextTokenObjective(), components=built.components, eval_batches=held_out,
        flops_per_token=built.flops_per_token, lineage=built.lineage, lr_scales=built.lr_scales,
    )
    try:
        return trainer.fit()
    finally:
        built.engine.close()


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc pretrain`: train, then (rank 0 only, under torchrun) report where the run ended."""
    return report_done(cfg, run(cfg))
