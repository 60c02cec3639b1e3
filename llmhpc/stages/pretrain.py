"""Recipe: pretrain a Llama-family model on a packed token corpus.

    llmhpc pretrain model=tiny trainer.max_steps=50 trainer.lr=3e-4 run.dir=runs/x

Prepares (or reuses) the token shards, builds the model (fresh on the meta device, or from
`model.init_from`), and hands everything to the shared `Trainer`. Running the same command
again resumes from the newest complete checkpoint in `run.dir`.
"""

from __future__ import annotations

import dataclasses

import torch

from llmhpc.config import Config, ConfigError
from llmhpc.data.prepare import prepare_corpus
from llmhpc.data.pretrain import PackedTokens, PretrainLoader, eval_batches
from llmhpc.data.tokenizer import load_tokenizer
from llmhpc.models import build_model, load_pretrained
from llmhpc.train.optim import build_optimizer
from llmhpc.train.trainer import Trainer, TrainResult, resolve_device


def build_model_for(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A fresh model from cfg.model, or the weights of cfg.model.init_from; returns (model, lineage)."""
    if cfg.model.init_from:
        model, _ = load_pretrained(cfg.model.init_from, device=str(device))
        return model, {"init_from": str(cfg.model.init_from)}
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg.model, device=device), {"init_from": None}


def run(cfg: Config) -> TrainResult:
    device = resolve_device(cfg.run.device)
    model, lineage = build_model_for(cfg, device)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
            f"set model.vocab_size={len(tokenizer)}"
        )
    data_dir = prepare_corpus(cfg.data, seed=cfg.run.seed)
    t = cfg.trainer
    loader = PretrainLoader(
        PackedTokens(data_dir, "train"), t.seq_len, t.micro_batch_size, cfg.run.seed, cfg.data.document_masking
    )
    held_out = []
    if t.eval_every and cfg.data.val_fraction > 0:
        held_out = eval_batches(PackedTokens(data_dir, "val"), t.seq_len, t.micro_batch_size, t.eval_batches)
    if cfg.model.init_from:  # the checkpoint's shape wins; record it so the lineage stays readable
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(model.cfg, init_from=cfg.model.init_from))
    flops_per_token = model.flops_per_token(t.seq_len)
    if cfg.parallel.compile:
        model.compile()
    optimizer = build_optimizer(model, t)
    trainer = Trainer(
        cfg, model, optimizer, loader, eval_batches=held_out, flops_per_token=flops_per_token, lineage=lineage
    )
    return trainer.fit()
