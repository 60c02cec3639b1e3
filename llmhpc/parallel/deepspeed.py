"""DeepSpeed ZeRO-1/2/3 as an alternative data-parallel engine (`parallel.engine=deepspeed`).

FSDP2 is the default (see docs/parallelism.md); this module lets the same trainer drive a
`DeepSpeedEngine` instead, with the same math and the same checkpoints:

- `deepspeed_config` builds the DeepSpeed config from our trainer settings, and
  `wrap_with_deepspeed` wraps a plain model and our own `torch.optim.AdamW` into an engine, on the
  process group our code already initialized (gloo on CPU, NCCL on GPU).
- `backward` and `step` are one optimizer step of the trainer (`llmhpc.train.engine.DeepSpeedStepEngine`
  runs the objective through the engine): every micro-batch's summed loss divided by the global
  normalizer and multiplied by the dp size, one backward per micro-batch, then clipping to `grad_clip`
  (global norm) and AdamW. DeepSpeed averages gradients over the data-parallel ranks like DDP/FSDP, so the
  update equals one process's. This module knows no loss.
- `engine_state_dicts` / `load_engine_state_dicts` convert between the engine's partitioned fp32
  master weights and optimizer states and the full, FQN-keyed `{"model": ..., "optim": ...}` state
  dicts that `torch.distributed.checkpoint.state_dict.get_state_dict` gives for a plain model, so a
  DeepSpeed run saves DCP checkpoints that a plain or FSDP run resumes, and vice versa.

DeepSpeed is an extra: `DS_BUILD_OPS=0 pip install --no-build-isolation 'llmhpc[deepspeed]'`.
It is imported only when these functions run, so this module imports without it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

ZERO_STAGES = (1, 2, 3)


def _deepspeed():
    """Import DeepSpeed, naming the CPU accelerator explicitly where there is no GPU.

    Without DS_ACCELERATOR DeepSpeed probes for accelerators and falls back to CPU with a warning;
    the variable has to be set before the first import, which picks the accelerator for the process.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(
            "parallel.engine=deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install --no-build-isolation "
            "'llmhpc[deepspeed]'"
        ) from exc
    return deepspeed


def deepspeed_config(
    zero_stage: int, micro_batch_size: int, grad_accum_steps: int, grad_clip: float, bf16: bool
) -> dict:
    """The DeepSpeed config for one of our runs.

    micro_batch_size is per rank and grad_accum_steps the micro-batches each rank runs per optimizer
    step (DeepSpeed derives the global batch from them and the world size). grad_clip <= 0 disables
    clipping. bf16 keeps bf16 weights with fp32 master weights and optimizer state (DeepSpeed's mixed
    precision), which is not our autocast: losses are close to, not equal to, a bf16 run of our loop.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"parallel.zero_stage={zero_stage} is not a ZeRO stage; choose one of {ZERO_STAGES}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": max(float(grad_clip), 0.0),
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": {
            "stage": zero_stage,
            # Overlapping communication with backward needs side streams; without it the reductions
            # run in a fixed order and the results are reproducible.
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
        "steps_per_print": 2**31 - 1,  # our trainer logs; DeepSpeed's own step reports stay quiet
        "wall_clock_breakdown": False,
    }


def wrap_with_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> DeepSpeedEngine:
    """Wrap `model` and its optimizer (our `torch.optim.AdamW`, fused or not) into a DeepSpeed engine.

    The torch.distributed process group must already be initialized; DeepSpeed adopts it. The engine
    forwards attribute access to the model (`engine.lm_head_weight()` works), and `engine.module` is
    `model` itself, so parameter FQNs stay the model's.

    At the end of a run call `engine.destroy()`, drop the references to the engine, model and optimizer
    and `gc.collect()` before destroying the process group: left to interpreter exit, ZeRO-3 processes
    sometimes abort there ("terminate called without an active exception") after a complete run.
    """
    deepspeed = _deepspeed()
    if not dist.is_initialized():
        raise RuntimeError("parallel.engine=deepspeed needs an initialized process group: launch with torchrun")
    if deepspeed.get_accelerator().device_name() == "cpu":
        # Starting its comm backend on CPU, DeepSpeed JIT-compiles a shared-memory all-reduce kernel
        # (about 2 minutes on 2 cores) that only tensor-parallel inference uses; training never does.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    names = {id(p): name for name, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    if engine.zero_optimization_stage() == 3:
        head = getattr(model, "lm_head_weight", None)
        if callable(head) and head() is not None and not any(head() is p for p in model.parameters(recurse=False)):
            # Objectives multiply by the head's weight outside the head's own forward (the fused loss, per-token
            # log-probs; a tied head is the embedding's weight): the model's forward must gather it (and its
            # backward re-gather it) under ZeRO-3, so the objective runs inside that forward (`on_hidden`).
            deepspeed.zero.register_external_parameter(model, head())
    engine.llmhpc_group_names = group_names  # FQNs of each optimizer group, for the state dicts
    return engine


# ---- one optimizer step ------------------------------------------------------------------------


def backward(engine: DeepSpeedEngine, loss: torch.Tensor) -> None:
    """Backward of one micro-batch's loss, already scaled like our loop (/ global tokens * dp size).

    `scale_wrt_gas=False`: the loss is not divided again by the accumulation steps. Between
    accumulation boundaries `engine.step()` only advances DeepSpeed's micro-batch counter (ZeRO-2/3
    reduce each micro-batch's gradients into their partitions meanwhile); the update is `step`'s.
    """
    engine.backward(loss, scale_wrt_gas=False)
    if not engine.is_gradient_accumulation_boundary():
        engine.step()


def step(engine: DeepSpeedEngine) -> float:
    """Clip to the configured global norm and step AdamW; returns the global gradient norm before clipping.

    Call after the last micro-batch's `backward`: the number of micro-batches per step must be the
    config's gradient_accumulation_steps. A non-finite gradient norm makes DeepSpeed skip the update
    (fp32; bf16 only with its overflow check on) and return inf, as our loop's non-finite guard does.
    """
    if not engine.is_gradient_accumulation_boundary():
        raise RuntimeError(
            f"step() after a number of backward() calls that is not gradient_accumulation_steps="
            f"{engine.gradient_accumulation_steps()}"
        )
    engine.step()
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


# ---- checkpoint interop ------------------------------------------------------------------------


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that `model.state_dict()` holds (non-persistent ones such as RoPE tables excluded)."""
    found = {}
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                found[f"{prefix}.{name}" if prefix else name] = buf
    return found


def _flat_groups(engine: DeepSpeedEngine) -> list[list[torch.Tensor]]:
    """This rank's flat fp32 partitions that our AdamW steps (keys of its state), one list per param group.

    ZeRO-1/2 keep one partition per group; ZeRO-3 one per sub-group, and puts them into the AdamW's
    param_groups only while it steps them.
    """
    zero = engine.optimizer
    if engine.zero_optimization_stage() < 3:
        return [[flat] for flat in zero.single_partition_of_fp32_groups]
    groups: list[list[torch.Tensor]] = [[] for _ in zero.optimizer.param_groups]
    for sub_group, flat in enumerate(zero.fp32_partitioned_groups_flat):
        groups[zero.sub_group_to_group_id[sub_group]].append(flat)
    return groups


def _group_options(engine: DeepSpeedEngine) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]


def _link_optimizer_state_views(engine: DeepSpeedEngine) -> None:
    """Let ZeRO-1/2 find every parameter's slice of the flat AdamW states (ZeRO-3 needs nothing).

    ZeRO-1/2 reach them through views that DeepSpeed (0.19.8) makes once, right after stepping the
    first param group for the first time, so the parameters of our second group (norms, no weight
    decay) get none. Remaking the views over all groups is cheap and safe at any time.
    """
    if engine.zero_optimization_stage() < 3:
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def engine_state_dicts(engine: DeepSpeedEngine, model: nn.Module) -> tuple[dict, dict]:
    """(model_sd, optim_sd) in `get_state_dict(model, optimizer)`'s format for a plain model + AdamW.

    Collective: every rank must call it; every rank gets full (unsharded) CPU tensors. Weights are the
    fp32 master weights (also under bf16); optimizer state is FQN-keyed {"step", "exp_avg", ...} with
    param_groups listing FQNs. Before the first step it is AdamW's initial state (step 0, zero moments),
    so the result also serves as the template that `torch.distributed.checkpoint.load` fills in.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    deepspeed = _deepspeed()
    zero3 = engine.zero_optimization_stage() == 3

    def full_weight(p: nn.Parameter) -> torch.Tensor:
        value = safe_get_full_fp32_param(p)  # the fp32 master weight of a trained parameter
        if value is None:  # frozen (e.g. a LoRA base weight): no master, the parameter itself
            with deepspeed.zero.GatheredParameters([p], enabled=zero3):
                value = p.detach().clone()
        return value.detach().cpu().clone()

    params = dict(model.named_parameters())
    model_sd = {name: full_weight(p) for name, p in params.items()}
    model_sd.update({name: buf.detach().cpu().clone() for name, buf in _persistent_buffers(model).items()})

    _link_optimizer_state_views(engine)
    base_state = engine.optimizer.optimizer.state
    state: dict[str, dict[str, torch.Tensor]] = {}
    options = _group_options(engine)
    for names, flats, group in zip(engine.llmhpc_group_names, _flat_groups(engine), options, strict=True):
        flat_state = base_state.get(flats[0]) if flats else None
        for name in names:
            if not flat_state:  # no step yet: the state AdamW's first step starts from
                keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group.get("amsgrad") else [])
                state[name] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(model_sd[name]) for k in keys}}
                continue
            entry = {}
            for key, value in flat_state.items():
                if value.dim() == 0:  # "step": one count for the whole group
                    entry[key] = value.detach().cpu().clone()
                else:
                    full = safe_get_full_optimizer_state(params[name], key)
                    entry[key] = full.detach().cpu().clone().reshape(model_sd[name].shape)
            state[name] = entry
    groups = [{**group, "params": list(names)} for group, names in zip(options, engine.llmhpc_group_names, strict=True)]
    return model_sd, {"state": state, "param_groups": groups}


@torch.no_grad()
def load_engine_state_dicts(engine: DeepSpeedEngine, model: nn.Module, model_sd: dict, optim_sd: dict) -> None:
    """Load full FQN-keyed state dicts (a plain or FSDP run's, or `engine_state_dicts`') into the engine.

    Collective: every rank calls it with the same full state dicts. Sets the fp32 master weights and
    the model's (possibly bf16, possibly ZeRO-3-partitioned) weights, the AdamW states and step
    counts, and the param-group options (lr, betas, eps, weight decay), as `Optimizer.load_state_dict`.
    """
    deepspeed = _deepspeed()
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    # Frozen parameters are not in checkpoints (their base rebuilds them): only the trained ones are set.
    params = {name: p for name, p in model.named_parameters() if p.requires_grad or name in model_sd}
    missing = sorted(set(params) - set(model_sd))
    if missing:
        raise KeyError(f"model state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    zero3 = engine.zero_optimization_stage() == 3
    for name, p in params.items():
        value = model_sd[name].detach().to(torch.float32).cpu()
        safe_set_full_fp32_param(p, value.to(p.device))
        if zero3:
            # Gather the partitioned weight, write it on rank 0, re-partition (rank 0's copy is broadcast).
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(value.reshape(p.shape))
        else:
            p.data.copy_(value.reshape(p.shape))  # ZeRO-1/2 keep the full weights on every rank
    for name, buf in _persistent_buffers(model).items():
        buf.copy_(model_sd[name])

    # Param-group options, matched to our groups by their FQNs.
    by_first_name = {group["params"][0]: group for group in optim_sd["param_groups"] if group["params"]}
    for names, group in zip(engine.llmhpc_group_names, engine.optimizer.param_groups, strict=True):
        saved = by_first_name.get(names[0]) if names else None
        if saved is not None:
            group.update({k: v for k, v in saved.items() if k != "params"})

    state = optim_sd["state"]
    if not state:
        return  # saved before its first step: nothing to load
    base_state = engine.optimizer.optimizer.state
    groups = zip(engine.llmhpc_group_names, _flat_groups(engine), engine.optimizer.param_groups, strict=True)
    for names, flats, group in groups:
        saved = state.get(names[0]) if names else None
        if saved is None:
            continue
        for flat in flats:  # torch creates AdamW state lazily: create it for a fresh engine
            entry = base_state.setdefault(flat, {})
            # torch keeps "step" on the parameter's device for its fused and capturable kernels, else on the CPU
            step_device = flat.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
            for key, value in saved.items():
                if value.dim() == 0:
                    entry[key] = value.detach().to(device=step_device, dtype=torch.float32, copy=True)
                elif key not in entry:
                    entry[key] = torch.zeros_like(flat, dtype=torch.float32)
    _link_optimizer_state_views(engine)
    for name, p in params.items():
        for key, value in state.get(name, {}).items():
            if value.dim() > 0:
                safe_set_full_optimizer_state(p, value.detach().to(device=p.device, dtype=torch.float32), key)
