"""The one builder every stage uses: from a config to a laid-out model, its optimizer and the engine that steps it.

    with distributed_run(cfg) as run:            # process group, device, layout, mesh
        built = build(cfg, run)                  # model → layout → init or load shards → optimizer → engine
        Trainer(built.cfg, built.engine, batches, objective, components=built.components, ...).fit()

The order matters and is the same for every stage:

1. the model is built on the meta device (fresh, or in the shape of `model.init_from`), so no rank ever
   holds a whole model it does not keep (except peft=qlora under FSDP2: each rank reads the base whole onto
   its CPU and stores it as NF4 before sharding, because FSDP2 shards an NF4 weight, not a plain one, in NF4);
2. precision=fp8 swaps in float8 linears (before any sharding wraps them);
3. `trainer.freeze` marks parameters that do not train;
4. the layout is applied (TP → activation checkpointing → compile → FSDP2 / DDP, or pipeline stages);
5. each rank materializes and initializes only its shards — drawn from the run's seed exactly as one
   process would, or read from `model.init_from` (peft=qlora: then stored as NF4, under TP shard by shard);
6. the optimizer is built over the trainable parameters (parameter groups with their own learning-rate
   scale and weight decay), last, on the final parameters;
7. the engine that runs a step on this backend wraps them (`LocalEngine`, `PipelineEngine`, or
   `DeepSpeedStepEngine`, which partitions a materialized model itself).

A stage supplies its data and its objective; everything else comes from here.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmhpc.checkpoint import Component
from llmhpc.checkpoint.lineage import source_fingerprint
from llmhpc.config import Config, ConfigError
from llmhpc.config.layout import ParallelDims, resolve_layout, world_size_from_env
from llmhpc.models import build_model, load_pretrained
from llmhpc.models.llama import init_score_head
from llmhpc.parallel import dp_mesh, parallelize
from llmhpc.process_group import destroy_distributed, init_distributed
from llmhpc.train.engine import DeepSpeedStepEngine, Engine, LocalEngine, PipelineEngine
from llmhpc.train.optim import build_optimizer
from llmhpc.train.reduce import DataParallelReducer

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class RunContext:
    """Where a run executes: its device, the validated layout and the DeviceMesh over its processes."""

    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh | None


@contextmanager
def distributed_run(cfg: Config) -> Iterator[RunContext]:
    """Join the process group of a torchrun launch (nothing for one process), build the mesh, and leave at the end
    (unless the group was already up when called).

    fp8 is refused here, before any process group, data or model exists, on a device without FP8 matmuls.
    """
    import torch.distributed as dist

    from llmhpc.parallel.float8 import require_fp8_device
    from llmhpc.train.trainer import resolve_device

    _, dims = resolve_layout(cfg, world_size_from_env())
    device = resolve_device(cfg.run.device)
    if cfg.precision.name == "fp8":
        require_fp8_device(device)
    joined = not dist.is_initialized()  # a caller that set up the group itself keeps it
    device = init_distributed(device, dims.world_size, cfg.run.collective_timeout_s)
    try:
        yield RunContext(device, dims, dims.build_mesh(device.type))
    finally:
        gc.collect()  # engines (DeepSpeed ZeRO-3) must be gone before their process group, or exit can abort
        if joined:
            destroy_distributed()


@dataclass
class Built:
    """What `build` returns: everything a Trainer needs besides the data and the objective."""

    cfg: Config
    """The run's config; with model.init_from, its model section is the source's shape."""
    engine: Engine
    components: list[Component]
    """What checkpoints hold: the model and its optimizer as component 'model'."""
    lr_scales: list[float]
    """Multiplier of the scheduled learning rate for each optimizer param group."""
    lineage: dict
    """Where the weights came from (init_from source, fingerprint), saved with every checkpoint."""
    flops_per_token: float


def build_model_for(cfg: Config, device: torch.device) -> tuple[nn.Module, dict]:
    """A fresh model from cfg.model, or the weights of cfg.model.init_from; returns (model, lineage).

    On the meta device a model only has shapes (with init_from, the source's shape): `parallelize` then shards
    it, and `initialize_sharded` fills each rank's shards, drawn or loaded."""
    if cfg.model.init_from:
        from llmhpc.models.sharded_load import model_config_of

        lineage = {"init_from": str(cfg.model.init_from)}
        if device.type == "meta":  # the source's shape only; `initialize_sharded` loads each rank's shards
            shape = model_config_of(cfg.model.init_from)
            if cfg.model.score_head:  # a reward model from a language model: the head starts from the seed
                shape = dataclasses.replace(shape, score_head=True)
            return build_model(shape, device=device), lineage
        model, _ = load_pretrained(cfg.model.init_from, device=str(device))  # the whole model (DeepSpeed)
        return model, lineage
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg.model, device=device), {"init_from": None}


def initialize_sharded(model: nn.Module, parts: list[nn.Module], cfg: Config, device: torch.device) -> dict:
    """Materialize a model built on the meta device and already parallelized into `parts` on `device`, with the
    weights `build_model_for` gives one process (same seed, same draws; each rank keeps its own shards), or with
    those of cfg.model.init_from, each rank reading only its shards. Returns what the load adds to the lineage."""
    from llmhpc.models.sharded_load import load_into

    if cfg.model.init_from:  # materializes once the source is indexed: its parsed metadata is gone by then
        lineage = load_into(model, cfg.model.init_from, parts=parts, device=device)
        if lineage.get("score_head") == "new":
            init_score_head(model, cfg.run.seed)
        return lineage
    model.to_empty(device=device)
    for part in parts:  # pipeline stages: FSDP2 re-registers the parameters it manages on their root modules
        if part is not model:
            part.to_empty(device=device)
    torch.manual_seed(cfg.run.seed)
    model.init_weights()
    for part in parts:
        if part is not model:
            part.share_rope_tables(model)
    return {}


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Stop gradients for the parameters whose names match any glob pattern; returns their names.

    Called on the whole model before any layout applies (sharding and TP keep whether a parameter trains). A
    pattern that matches nothing is a mistake (a typo would silently train everything): `ConfigError`.
    """
    from llmhpc.parallel.pipeline import checkpoint_name

    names = [checkpoint_name(model, name) for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch(name, pattern) for name in names):
            raise ConfigError(
                f"trainer.freeze pattern {pattern!r} matches no parameter; names look like {', '.join(names[:3])}"
            )
    frozen = []
    for name, param in zip(names, model.parameters(), strict=True):
        if any(fnmatch(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def _apply_lora(model: nn.Module, cfg: Config, dims: ParallelDims) -> bool:
    """With peft=lora, wrap the target projections in adapters and freeze the base (on the meta-device model,
    before any layout is applied). Returns whether adapters were added."""
    if cfg.peft.name == "none":
        return False
    if dims.pp > 1:
        raise ConfigError(f"peft={cfg.peft.name} runs on one process, FSDP2 / DDP / HSDP, TP or DeepSpeed; parallel.pp "
                          "must be 1 (an adapted model trains so little that data and tensor parallelism suffice)")
    if cfg.peft.name == "qlora" and (dims.dp_replicate > 1 or cfg.parallel.engine != "torch"
                                     or (dims.tp > 1 and dims.dp_shard > 1)):
        raise ConfigError("peft=qlora runs on one process, under FSDP2 (parallel.dp_shard) or under tensor parallel "
                          "(parallel.tp), not both at once; parallel.dp_replicate must be 1 and parallel.engine=torch "
                          "(or use peft=lora there)")
    if cfg.peft.name == "qlora" and 8 % dims.dp_shard:
        raise ConfigError(f"peft=qlora splits NF4 weights into runs of whole blocks for 1, 2, 4 or 8 shards; "
                          f"parallel.dp_shard={dims.dp_shard} is not one of them")
    if cfg.precision.name == "fp8":
        raise ConfigError(f"peft={cfg.peft.name} with precision=fp8 is not supported; use precision=bf16")
    from llmhpc.peft.lora import apply_lora, lora_settings

    apply_lora(model, lora_settings(cfg.peft))
    if model.score is not None:  # a reward model's head trains with the adapters (peft's modules_to_save)
        model.score.weight.requires_grad_(True)
    return True


def _quantize_base(model: nn.Module, cfg: Config) -> None:
    """peft=qlora: store the adapted projections' base as NF4 (once it holds its final weights)."""
    if cfg.peft.name == "qlora":
        from llmhpc.peft.nf4 import quantize_base_nf4

        quantize_base_nf4(model)


def _init_adapters(model: nn.Module, cfg: Config, lora: bool) -> None:
    """Draw the adapters from the run's seed, after the base holds its final weights (DoRA's magnitude is the
    norm of the base rows, NF4 ones for peft=qlora). A resumed run overwrites them with the checkpoint's."""
    if lora:
        from llmhpc.peft.lora import reset_lora_parameters

        torch.manual_seed(cfg.run.seed)
        reset_lora_parameters(model)


def _base_of(cfg: Config, frozen: list[str]) -> dict | None:
    """Where the frozen parameters of this run come from, recorded in (and checked against) checkpoints.

    Collective under torchrun when there are frozen parameters and a source to fingerprint."""
    if not frozen:
        return None
    if not cfg.model.init_from:
        return {"source": "init", "seed": cfg.run.seed}
    import torch.distributed as dist

    from llmhpc.models.sources import locate_weights

    source = locate_weights(cfg.model.init_from).path  # a run directory's newest step, which stays as it is
    box = [
        {"source": str(source.resolve()), **source_fingerprint(source)}
        if not dist.is_initialized() or dist.get_rank() == 0
        else None
    ]
    if dist.is_initialized():  # one rank reads the whole source to hash it
        dist.broadcast_object_list(box, src=0)
    return box[0]


def build(cfg: Config, run: RunContext) -> Built:
    """Build, lay out and initialize the model of `cfg`, its optimizer and the engine that steps it (see module doc)."""
    cfg, _ = resolve_layout(cfg, run.dims.world_size)  # trainer.micro_batch_size filled in
    t, device, dims, mesh = cfg.trainer, run.device, run.dims, run.mesh
    torch_engine = cfg.parallel.engine == "torch"
    # FSDP2 shards an NF4 weight as it is (torchao splits it into runs of whole blocks), so under peft=qlora the
    # base is read whole on each rank's CPU and quantized before sharding; every other run starts on meta (under
    # tensor parallel, each rank quantizes its own shard once loaded).
    quantize_first = cfg.peft.name == "qlora" and dims.fsdp
    on_meta = torch_engine and not quantize_first
    model, lineage = build_model_for(cfg, torch.device("cpu" if quantize_first else "meta" if on_meta else device))
    if cfg.model.init_from:  # the source's shape wins; record it so the lineage stays readable
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(model.cfg, init_from=cfg.model.init_from))
    flops_per_token = model.flops_per_token(t.seq_len)
    after_step = None
    if cfg.precision.name == "fp8":  # float8 linears go in before any sharding wraps them
        from llmhpc.parallel.float8 import apply_float8

        after_step = apply_float8(model, cfg.precision.fp8_recipe, fsdp=dims.fsdp, tp=dims.tp)
    frozen = freeze(model, list(t.freeze))
    lora = _apply_lora(model, cfg, dims)
    if lora:  # the whole base (no pipeline stages here, so parameter names are checkpoint names)
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    dp = DataParallelReducer(dp_mesh(mesh), device)
    bf16 = cfg.precision.name in ("bf16", "fp8")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    micro_batches = t.global_batch_size // (t.micro_batch_size * dims.dp_size)
    if torch_engine:
        if quantize_first:
            _quantize_base(model, cfg)
        parts = parallelize(model, dims, mesh, cfg.parallel, precision=cfg.precision.name)
        if on_meta:
            lineage.update(initialize_sharded(model, parts, cfg, device))
            _quantize_base(model, cfg)
        _init_adapters(model, cfg, lora)
        optimizer, lr_scales = build_optimizer(model, t)
        common = {"after_optimizer_step": after_step}
        if dims.pp > 1:
            from llmhpc.parallel.pipeline import PipelineRunner

            runner = PipelineRunner(parts, mesh["pp"], cfg.parallel.pp_schedule, micro_batches, device)
            engine: Engine = PipelineEngine(model, optimizer, dp, autocast, runner=runner, mesh=mesh, **common)
        else:
            loss_context = nullcontext
            if cfg.parallel.loss_parallel:
                from torch.distributed.tensor.parallel import loss_parallel as loss_context
            engine = LocalEngine(model, optimizer, dp, autocast, loss_context=loss_context, **common)
    else:  # DeepSpeed shards and reduces itself: none of our wrappers
        from llmhpc.parallel import deepspeed as ds

        _init_adapters(model, cfg, lora)
        optimizer, lr_scales = build_optimizer(model, t)
        ds_config = ds.deepspeed_config(cfg.parallel.zero_stage, t.micro_batch_size, micro_batches, t.grad_clip, bf16)
        ds_engine = ds.wrap_with_deepspeed(model, optimizer, ds_config)
        engine = DeepSpeedStepEngine(model, optimizer, dp, autocast, ds_engine=ds_engine)
    component = Component("model", model, optimizer, base=_base_of(cfg, frozen), **engine.checkpoint_converters())
    return Built(cfg, engine, [component], lr_scales, lineage, flops_per_token)
