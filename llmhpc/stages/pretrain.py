"""Recipe: pretrain a Llama-family model on a packed token corpus.

    llmhpc pretrain model=tiny trainer.max_steps=50 trainer.lr=3e-4 run.dir=runs/x

Prepares (or reuses) the token shards, builds the model (fresh on the meta device, or from
`model.init_from`), applies the parallel layout, and hands everything to the shared `Trainer`.
Running the same command again resumes from the newest complete checkpoint in `run.dir`, under
the same or any other layout. Several processes: `torchrun --nproc-per-node N -m llmhpc pretrain ...`.
"""

from __future__ import annotations

import dataclasses
import gc

import torch

from llmhpc.config import Config, ConfigError
from llmhpc.data.prepare import prepare_corpus
from llmhpc.data.pretrain import PackedTokens, PretrainLoader, eval_batches
from llmhpc.data.tokenizer import load_tokenizer
from llmhpc.models import build_model, load_pretrained
from llmhpc.parallel import dp_mesh, dp_rank, dp_size, parallelize, validate_layout
from llmhpc.parallel.dims import world_size_from_env
from llmhpc.parallel.float8 import apply_float8, require_fp8_device
from llmhpc.parallel.process_group import barrier, destroy_distributed, init_distributed, is_main_process
from llmhpc.train.losses import causal_lm_loss
from llmhpc.train.optim import build_optimizer
from llmhpc.train.trainer import Trainer, TrainResult, resolve_device


def build_model_for(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A fresh model from cfg.model, or the weights of cfg.model.init_from; returns (model, lineage).

    On the meta device a fresh model only has shapes: `parallelize` then shards it, and `initialize_sharded`
    fills each rank's shards."""
    if cfg.model.init_from:
        model, _ = load_pretrained(cfg.model.init_from, device=str(device))
        return model, {"init_from": str(cfg.model.init_from)}
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg.model, device=device), {"init_from": None}


def initialize_sharded(model: torch.nn.Module, parts: list[torch.nn.Module], cfg: Config, device: torch.device) -> None:
    """Materialize a model built on the meta device and already parallelized into `parts` on `device`, with the
    weights `build_model_for` gives one process (same seed, same draws; each rank keeps its own shards)."""
    model.to_empty(device=device)
    for part in parts:  # pipeline stages: FSDP2 re-registers the parameters it manages on their root modules
        if part is not model:
            part.to_empty(device=device)
    torch.manual_seed(cfg.run.seed)
    model.init_weights()
    for part in parts:
        if part is not model:
            part.share_rope_tables(model)


def run(cfg: Config) -> TrainResult:
    """Train under the layout of cfg.parallel on WORLD_SIZE processes (joining and leaving the process group)."""
    dims = validate_layout(cfg.parallel, world_size_from_env(), cfg.model, cfg.trainer)
    device = resolve_device(cfg.run.device)
    if cfg.precision.name == "fp8":
        require_fp8_device(device)  # before any process group, data or model exists
    device = init_distributed(device, dims.world_size)
    try:
        mesh = dims.build_mesh(device.type)
        return _train(cfg, device, dims, mesh)
    finally:
        gc.collect()  # engines (DeepSpeed ZeRO-3) must be gone before their process group, or exit can abort
        destroy_distributed()


def _train(cfg: Config, device: torch.device, dims, mesh) -> TrainResult:
    # FSDP2 / TP / PP shard the model while it is on the meta device, then each rank initializes only its shards
    # (no rank ever holds the whole model). DeepSpeed partitions a materialized model itself; init_from loads one.
    sharded_init = cfg.parallel.engine == "torch" and not cfg.model.init_from
    model, lineage = build_model_for(cfg, torch.device("meta") if sharded_init else device)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
            f"set model.vocab_size={len(tokenizer)}"
        )
    if not is_main_process():  # rank 0 tokenizes once; the others then find the prepared shards
        barrier()
    data_dir = prepare_corpus(cfg.data, seed=cfg.run.seed)
    if is_main_process():
        barrier()
    t = cfg.trainer
    loader = PretrainLoader(
        PackedTokens(data_dir, "train"), t.seq_len, t.micro_batch_size, cfg.run.seed, cfg.data.document_masking,
        dp_rank=dp_rank(mesh), dp_size=dp_size(mesh),
    )
    held_out = []
    if t.eval_every and cfg.data.val_fraction > 0:
        held_out = eval_batches(PackedTokens(data_dir, "val"), t.seq_len, t.micro_batch_size, t.eval_batches)
    if cfg.model.init_from:  # the checkpoint's shape wins; record it so the lineage stays readable
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(model.cfg, init_from=cfg.model.init_from))
    flops_per_token = model.flops_per_token(t.seq_len)
    after_step = None
    if cfg.precision.name == "fp8":  # float8 linears go in before any sharding wraps them
        after_step = apply_float8(model, cfg.precision.fp8_recipe, fsdp=dims.fsdp, tp=dims.tp)
    micro_batches = t.global_batch_size // (t.micro_batch_size * dims.dp_size)
    pipeline, engine, loss_fn = None, None, causal_lm_loss
    if cfg.parallel.engine == "deepspeed":  # DeepSpeed shards and reduces itself: none of our wrappers
        from llmhpc.parallel import deepspeed as ds

        optimizer = build_optimizer(model, t)
        ds_config = ds.deepspeed_config(
            cfg.parallel.zero_stage, t.micro_batch_size, micro_batches, t.grad_clip, cfg.precision.name == "bf16"
        )
        engine, loss_fn = ds.wrap_with_deepspeed(model, optimizer, ds_config), ds.engine_lm_loss
    else:
        parts = parallelize(model, dims, mesh, cfg.parallel)
        if sharded_init:
            initialize_sharded(model, parts, cfg, device)
        if dims.pp > 1:
            from llmhpc.parallel.pipeline import PipelineRunner

            pipeline = PipelineRunner(parts, mesh["pp"], cfg.parallel.pp_schedule, micro_batches, device)
        optimizer = build_optimizer(model, t)
    trainer = Trainer(
        cfg, model, optimizer, loader, loss_fn=loss_fn, eval_batches=held_out, flops_per_token=flops_per_token,
        lineage=lineage, dp_mesh=dp_mesh(mesh), pipeline=pipeline, after_optimizer_step=after_step, deepspeed=engine,
    )
    try:
        return trainer.fit()
    finally:
        if engine is not None:
            engine.destroy()
