"""Tensor parallel (+ sequence parallel) for the plain `Llama`, as DTensor plans over a 1-D TP mesh.

The model class is untouched: `apply_tensor_parallel` swaps parameters for DTensor shards and adds
input/output hooks through `torch.distributed.tensor.parallel.parallelize_module`. Layout of one block
(Megatron's TP, with the sequence-parallel refinement of Korthikanti et al., 2022):

    residual stream [B, S/tp, dim] (sequence-sharded when SP, replicated otherwise)
      -> attention_norm (SequenceParallel: the norm runs on the local sequence chunk)
      -> attention input all-gathered to the full sequence (PrepareModuleInput)
      -> wq, wk, wv column-wise (each rank owns whole heads) -> RoPE + SDPA on local heads
      -> wo row-wise: partial sums reduce-scattered back onto the sequence shard
      (the same for ffn_norm -> w1, w3 column-wise -> w2 row-wise)

Attention always sees the whole sequence, so the RoPE angles (a table slice, or per-row cos/sin
gathered at `position_ids` / padding-derived positions) and the attention mask (from `document_ids` and
the padding `attention_mask`), all built by `Llama.hidden_states` from replicated inputs, are the
single-process ones unchanged: plain tensors that pass through `PrepareModuleInput` untouched.
"""

from __future__ import annotations

from functools import cache, partial
from types import MethodType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from llmhpc.config.layout import validate_tp
from llmhpc.models.adapters import ROW_PARALLEL

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from llmhpc.models.llama import Llama

_ATTENTION_ARGS = 7
"""Positional arguments `TransformerBlock` passes to `Attention.forward` (x, cos, sin, mask, cache, layer,
start); `PrepareModuleInput` needs one layout entry per positional input. Only x is sequence-sharded;
cos/sin ([S, D] or per-row [B, 1, S, D]) and the mask ([B, 1, S, S] or None) are full, plain tensors
that every rank builds identically, so their layout entries are None (left as they are)."""


def apply_tensor_parallel(
    model: Llama,
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool = True,
    loss_parallel: bool = False,
) -> Llama:
    """Shard `model` in place over the 1-D `tp_mesh` and return it.

    Every rank of the mesh must call this with a model of the same config; weights are taken from the
    mesh's first rank (column/row-wise shards are scattered from it, norm weights broadcast from it), so
    ranks need not have the same random init. Every rank of the mesh must then feed the same
    `input_ids` (and `document_ids`, `position_ids`, `attention_mask`): TP splits one batch's work,
    not the batch.

    Semantics kept: `model(input_ids)` returns full logits [B, S, vocab] as a plain tensor;
    `model.hidden_states(...)` and `model(..., return_hidden=True)` return full, plain [B, S, dim];
    `model.logits(hidden)` accepts that plain tensor. With `sequence_parallel` the sequence length must
    be a multiple of tp (checked on each forward).

    `loss_parallel=True` leaves the logits sharded on the vocabulary, as a DTensor with placement
    Shard(-1), so the cross entropy never materializes [B, S, vocab] on one rank. The loss and its
    backward must then both run inside `torch.distributed.tensor.parallel.loss_parallel()`:

        with loss_parallel():
            loss, n_tokens = causal_lm_loss(model, batch)   # F.cross_entropy on the Shard(-1) logits
            (loss / n_tokens).backward()

    `causal_lm_loss` takes its logits path here because the head weight is a DTensor.

    Tied embeddings are kept tied: the embedding (row-wise on the vocabulary) and the head (column-wise
    on the vocabulary) shard the same [vocab, dim] matrix the same way (Shard(0)), so the one DTensor
    parameter serves both and receives both gradients, as in the single-process model. Because the
    plain model has no head module when tied, the head's matmul is done by a replacement `logits`
    method bound to this instance (the state dict keeps its single `tok_embeddings.weight` key).

    Parameters keep whether they train (a frozen base stays frozen), and projections with LoRA adapters
    (`llmhpc.peft.lora.LoRALinear`) are split with their adapters (`_adapter_aware_styles`).

    Not supported under TP: the KV cache (it is sized for all KV heads; rejected on forward).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    AdaptedColwise, AdaptedRowwise = _adapter_aware_styles()

    tp = tp_mesh.size()
    validate_tp(model.cfg, tp)
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs a 1-D TP mesh, got {tp_mesh.ndim} dimensions")
    _broadcast_norm_weights(model, tp_mesh)
    # torch's SequenceParallel re-creates the norm weights as trainable: a frozen parameter must stay frozen.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    # A pipeline stage's pruned model (llmhpc.parallel.pipeline.split_model) may lack the embedding
    # (not the first stage) or the final norm and head (not the last stage); pipelines never tie them.
    has_embedding, has_head = model.tok_embeddings is not None, model.norm is not None
    tied = has_head and model.output is None
    seq_shard, replicate = Shard(1), Replicate()
    # The residual stream between blocks: sequence-sharded under SP, replicated (full) otherwise.
    stream = seq_shard if sequence_parallel else replicate

    top_plan: dict[str, Any] = {}
    if has_embedding:
        # Vocab-sharded rows: each rank looks up the ids it owns, the partial sums are reduced
        # (reduce-scattered onto the sequence under SP, all-reduced otherwise).
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=replicate, output_layouts=stream)
    if sequence_parallel and has_head:
        top_plan["norm"] = SequenceParallel()
    if top_plan:
        parallelize_module(model, tp_mesh, top_plan)
    if sequence_parallel and has_head:
        # Gather the final hidden states to the full sequence so `hidden_states` keeps its plain
        # [B, S, dim] contract; the head would need this all-gather anyway.
        parallelize_module(
            model.norm,
            tp_mesh,
            PrepareModuleOutput(output_layouts=seq_shard, desired_output_layouts=replicate, use_local_output=True),
        )
    head_out = Shard(-1) if loss_parallel else replicate
    if tied:
        model.logits = MethodType(_tied_logits_fn(head_out, use_local=not loss_parallel), model)
    elif has_head:
        parallelize_module(
            model.output,
            tp_mesh,
            ColwiseParallel(input_layouts=replicate, output_layouts=head_out, use_local_output=not loss_parallel),
        )

    for block in model.layers.values():
        block_plan: dict[str, Any] = {
            name: AdaptedRowwise(output_layouts=stream) if name in ROW_PARALLEL else AdaptedColwise()
            for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                         "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
        }
        if sequence_parallel:
            rest = (None,) * (_ATTENTION_ARGS - 1)
            block_plan.update(
                {
                    "attention_norm": SequenceParallel(),
                    "ffn_norm": SequenceParallel(),
                    # All-gather the normed chunk so the projections (and attention) see every position.
                    "attention": PrepareModuleInput(
                        input_layouts=(seq_shard, *rest),
                        desired_input_layouts=(replicate, *rest),
                        use_local_output=True,
                    ),
                    "feed_forward": PrepareModuleInput(
                        input_layouts=(seq_shard,), desired_input_layouts=(replicate,), use_local_output=True
                    ),
                }
            )
        parallelize_module(block, tp_mesh, block_plan)

    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    model.register_forward_pre_hook(_input_check(tp, sequence_parallel), with_kwargs=True)
    return model


def _has_adapters(module: nn.Module) -> bool:
    """A projection with low-rank adapters (`llmhpc.peft.lora.LoRALinear`): a frozen `weight` plus trainable
    `lora_A` [r, in], `lora_B` [out, r] and, for DoRA, `lora_magnitude` [out]."""
    return isinstance(getattr(module, "lora_A", None), nn.Parameter)


def _shard_parameters(
    placements: dict[str, Any], src_data_rank: int | None, name: str, module: nn.Module, device_mesh: DeviceMesh
) -> None:
    """`distribute_module`'s partition function: each parameter of `module` becomes a DTensor with the placement
    its name has in `placements` (scattered from `src_data_rank`, as torch's styles do), keeping whether it
    trains (the base stays frozen, the adapters train)."""
    from torch.distributed.tensor import distribute_tensor

    for param_name, param in list(module.named_parameters(recurse=False)):
        shard = distribute_tensor(param.detach(), device_mesh, [placements[param_name]], src_data_rank=src_data_rank)
        module.register_parameter(param_name, nn.Parameter(shard, requires_grad=param.requires_grad))


@cache
def _adapter_aware_styles() -> tuple[type, type]:
    """Column- and row-wise parallel styles that also take a projection with LoRA adapters.

    torch's styles shard `nn.Linear` and `nn.Embedding` only. An adapted projection y = W x + s B A x is split
    so that its adapter needs no communication of its own:

    - column-wise (W sharded on output rows): B is sharded like W's rows, A (and x) replicated; each rank
      computes its own output columns of both terms. DoRA's magnitude is per output row: sharded like B.
    - row-wise (W sharded on input columns, x on features): A is sharded like W's columns, B replicated; A x
      and W x are both partial sums, added before the one reduction the base projection needs anyway.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    colwise = {"weight": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0), "lora_magnitude": Shard(0)}
    rowwise = {"weight": Shard(1), "lora_A": Shard(1), "lora_B": Replicate(), "lora_magnitude": Replicate()}

    def distribute_adapted(style, module: nn.Module, device_mesh: DeviceMesh, placements: dict) -> nn.Module:
        """What the style does for an `nn.Linear`, with each parameter placed by `placements`."""
        return distribute_module(
            module, device_mesh, partial(_shard_parameters, placements, style.src_data_rank),
            partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
            partial(style._prepare_output_fn, style.output_layouts, style.use_local_output),
        )

    class AdaptedColwise(ColwiseParallel):
        """`ColwiseParallel`, also for a projection with LoRA adapters (see `_adapter_aware_styles`)."""

        def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
            if not _has_adapters(module):
                return super()._apply(module, device_mesh)
            return distribute_adapted(self, module, device_mesh, colwise)

    class AdaptedRowwise(RowwiseParallel):
        """`RowwiseParallel`, also for a projection with LoRA adapters (see `_adapter_aware_styles`)."""

        def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
            if not _has_adapters(module):
                return super()._apply(module, device_mesh)
            self.desired_input_layouts = (Shard(-1),)  # the input arrives sharded on features, as for a Linear
            return distribute_adapted(self, module, device_mesh, rowwise)

    return AdaptedColwise, AdaptedRowwise


@torch.no_grad()
def _broadcast_norm_weights(model: Llama, tp_mesh: DeviceMesh) -> None:
    """Copy the norm weights of the mesh's first rank to the others.

    `SequenceParallel` adopts each rank's local norm weight as the replicated value without checking,
    while the linear shards are scattered from the first rank; broadcasting makes a model whose norms
    were trained (not ones) consistent across ranks in both modes. Skipped on the meta device.
    """
    import torch.distributed as dist

    group = tp_mesh.get_group()
    src = dist.get_global_rank(group, 0)
    for module in model.modules():
        if type(module).__name__ == "RMSNorm" and module.weight.device.type != "meta":
            dist.broadcast(module.weight.data, src=src, group=group)


def _tied_logits_fn(head_out: Any, *, use_local: bool):
    """`Llama.logits` for a tied TP model: hidden [B, S, dim] (plain, full) @ the vocab-sharded embedding.

    The hidden states enter as a replicated DTensor so that DTensor's autograd all-reduces their
    gradient (each rank only sees its vocabulary slice's contribution).
    """
    from torch.distributed.tensor import DTensor, Replicate

    def logits(self: Llama, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.tok_embeddings.weight
        mesh = weight.device_mesh
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
        out = F.linear(hidden, weight)
        out = out.redistribute(mesh, [head_out])
        return out.to_local() if use_local else out

    return logits


def _input_check(tp: int, sequence_parallel: bool):
    """A forward pre-hook rejecting inputs the TP layout cannot run, with the reason."""

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("cache") is not None:
            raise ValueError(
                "a KV cache cannot be used with a tensor-parallel model: the cache holds all KV heads while each "
                "rank computes tp-th of them; generate with an unsharded copy of the model"
            )
        input_ids = args[0] if args else kwargs["input_ids"]
        if sequence_parallel and input_ids.shape[1] % tp:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} is not a multiple of tp={tp}, which sequence parallel "
                "needs; pad the sequence or use sequence_parallel=False"
            )

    return check
