"""Pipeline parallelism: the plain model cut into stages, run by a `torch.distributed.pipelining` schedule.

The model is split by transformer blocks. Stage 0 also owns the token embedding, the last stage the
final norm and the output head. Each rank builds the whole model on the meta device as usual, keeps
only the blocks of its own stages (`split_model` prunes the `Llama` in place, so checkpoint keys stay
`layers.<global index>...` and DCP reshards between any pipeline layouts), and wraps each local stage
in a small `StageModule` that the schedule calls.

Schedules (`parallel.pp_schedule`):
- 'gpipe': all forwards, then all backwards; simple, keeps every micro-batch's activations alive.
- '1f1b': one forward, one backward in the steady state; at most pp micro-batches in flight.
- 'interleaved_1f1b': several smaller stages per rank (`parallel.pp_stages_per_rank`, default 2),
  placed round-robin (rank r holds stages r, r+pp, ...); shrinks the bubble by that factor.
- 'zbv': zero-bubble "V" schedule, exactly 2 stages per rank placed as a V (rank r holds stages r
  and 2pp-1-r, so rank 0 holds the first and the last); splits backward into input and weight
  gradients to fill the bubble.

This module knows no loss: `PipelineRunner.train_step` takes a `score` for the last stage's output (the
engine in `llmhpc.train.engine` builds it from the stage's objective, scaled by dp_size / the global
normalizer), and the schedule runs with `scale_grads=False`, so gradients equal the single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from llmhpc.parallel.dims import stages_per_rank

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from llmhpc.config.schema import ParallelConfig
    from llmhpc.models.llama import Llama


def stage_layer_ranges(n_layers: int, n_stages: int, split_points: list[int]) -> list[range]:
    """The block indices of every stage: cut before each split point, or evenly when none are given.

    Callers validate first (`llmhpc.parallel.dims.validate_layout`); here bad input is a programming error.
    """
    bounds = [0, *split_points, n_layers] if split_points else [i * n_layers // n_stages for i in range(n_stages + 1)]
    if len(bounds) != n_stages + 1 or any(b >= e for b, e in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"split points {split_points} do not cut {n_layers} layers into {n_stages} stages")
    return [range(b, e) for b, e in zip(bounds, bounds[1:], strict=False)]


def stage_holder(stage: int, pp: int, schedule: str) -> int:
    """Pipeline rank that holds `stage`: round-robin for the looped schedules, a V for 'zbv'."""
    if schedule == "zbv":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def local_stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    """Stages held by `pp_rank`, in stage order."""
    return [s for s in range(pp * per_rank) if stage_holder(s, pp, schedule) == pp_rank]


class StageModule(nn.Module):
    """One pipeline stage: a contiguous run of blocks, plus the embedding (first) or norm and head (last).

    Its submodules are the very modules of the pruned `Llama`, shared, not copied: the optimizer and
    the checkpoint manager work on the `Llama` (global parameter names), the schedule on the stages.
    """

    def __init__(self, model: Llama, index: int, n_stages: int, layer_ids: range, sequence_shards: int = 1) -> None:
        super().__init__()
        self.index = index
        self.n_stages = n_stages
        self.sequence_shards = sequence_shards
        """Under sequence parallel the hidden states between stages hold 1/tp of the positions."""
        self.tok_embeddings = model.tok_embeddings if index == 0 else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        last = index == n_stages - 1
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def share_rope_tables(self, model: Llama) -> None:
        """Use the model's RoPE tables again, after `to_empty` gave both of them new (meta-built) ones."""
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin

    def forward(
        self,
        x: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids → hidden states (first stage), hidden → hidden, or hidden → final-norm hidden (last stage),
        which the objective scores through `logits` / `lm_head_weight` (an `LMHead`).

        The optional [B, S] tensors mean what they mean for `Llama.hidden_states` (no KV cache here).
        Every stage receives them, since each rebuilds the RoPE angles and the mask for its own blocks.
        """
        from llmhpc.models.llama import attention_mask_for, rope_at, token_positions

        batch = x.shape[0]
        seq = x.shape[1] if self.tok_embeddings is not None else x.shape[1] * self.sequence_shards
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        positions = token_positions(batch, seq, 0, position_ids=position_ids, attention_mask=attention_mask)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, positions, 0, seq)
        mask = attention_mask_for(
            batch, seq, 0, attention_mask=attention_mask, document_ids=document_ids, device=h.device
        )
        for name, block in self.layers.items():
            h = block(h, cos, sin, mask, None, int(name), 0)
        if self.norm is not None:
            h = self.norm(h)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last stage's head: final-norm hidden states → logits."""
        return self.output(hidden)

    def lm_head_weight(self) -> torch.Tensor:
        """The [vocab, dim] matrix `logits` multiplies by, for losses that fuse the head with softmax."""
        return self.output.weight


def split_model(model: Llama, pp_rank: int, p: ParallelConfig) -> list[StageModule]:
    """Prune `model` in place to the blocks of `pp_rank`'s stages and return those stages, in stage order.

    The embedding survives only on the rank holding stage 0, the final norm and head only on the rank
    holding the last stage. With tied embeddings the last stage gets its own copy of the embedding matrix
    as its head (`model.output`, see `TiedHeadSync`), also when one rank holds both ends (ZBV's V).
    """
    per_rank = stages_per_rank(p)
    n_stages = p.pp * per_rank
    ranges = stage_layer_ranges(model.cfg.n_layers, n_stages, list(p.pp_split_points))
    ids = local_stage_ids(pp_rank, p.pp, per_rank, p.pp_schedule)
    if model.cfg.tie_embeddings and n_stages - 1 in ids:
        weight = model.tok_embeddings.weight
        model.output = nn.Linear(
            model.cfg.dim, model.cfg.vocab_size, bias=False, device=weight.device, dtype=weight.dtype
        )
    stages = [StageModule(model, i, n_stages, ranges[i], sequence_shards=p.tp) for i in ids]
    keep = {str(layer) for i in ids for layer in ranges[i]}
    for name in list(model.layers):
        if name not in keep:
            del model.layers[name]
    if 0 not in ids:
        model.tok_embeddings = None
    if n_stages - 1 not in ids:
        model.norm = None
        model.output = None
    return stages


EMBEDDING, HEAD_COPY = "tok_embeddings.weight", "output.weight"


def has_tied_head_copy(model: Llama) -> bool:
    """This rank's pruned model holds the last stage's copy of a tied embedding."""
    return model.cfg.tie_embeddings and model.output is not None


def checkpoint_name(model: nn.Module, name: str) -> str:
    """The name a parameter has in checkpoints and configs: a tied head copy is the embedding it copies."""
    from llmhpc.models.llama import stored_names

    return stored_names(model).get(name, name)


class TiedHeadSync:
    """Tied embeddings under pipeline parallel, as Megatron does them.

    The embedding lives on the first stage and the head on the last, usually on different ranks, so the last
    stage holds a copy of the matrix (`split_model`), initialized equal (`Llama.init_weights` and the weight
    loaders fill it from the embedding's values). Before each optimizer step the two gradients are summed
    across the holders of the first and the last stage, so both copies take the same update and stay equal;
    the gradient norm counts the matrix once, and checkpoints keep one tensor (`state_converters`).
    """

    def __init__(self, model: Llama, mesh: DeviceMesh, holders: list[int]) -> None:
        self.params = []
        if model.tok_embeddings is not None:
            self.params.append(model.tok_embeddings.weight)
        if has_tied_head_copy(model):
            self.params.append(model.output.weight)
        self.group = None
        if holders[0] == holders[-1]:  # one rank holds both ends (ZBV's V): the sum is local
            return
        # One 2-rank group per pipeline (one per data / tensor parallel coordinate), created by every rank in the
        # same order, as process groups must be: rows of the mesh with the pp dimension last are the pipelines.
        names = list(mesh.mesh_dim_names)
        pipelines = mesh.mesh.movedim(names.index("pp"), -1).reshape(-1, mesh.mesh.shape[names.index("pp")])
        for pipeline in pipelines.tolist():
            pair = [pipeline[holders[0]], pipeline[holders[-1]]]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                self.group = group

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        """Sum the embedding's and the head copy's gradients; both end up with the sum."""
        from torch.distributed.tensor import DTensor

        for p in self.params:
            # Under TP the embedding's gradient can come back with other placements than its weight (partial
            # sums over the tensor-parallel ranks): lay it out like the weight, so both ends hold the same slice.
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.grad.device_mesh, p.placements)
        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        if len(grads) == 2:  # one rank holds both ends
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
        elif len(grads) == 1 and self.group is not None:
            dist.all_reduce(grads[0], group=self.group)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _rename_in_groups(optim_sd: dict, old: str, new: str | None) -> None:
    """Rename (or with new=None drop) a parameter in the FQN lists of an optimizer state dict's param groups."""
    for group in optim_sd["param_groups"]:
        params = group["params"]
        if old in params:
            params.remove(old)
            if new is not None:
                params.append(new)


def head_copy_to_checkpoint(model: Llama, model_sd: dict, optim_sd: dict) -> None:
    """In place: the head copy saved as the embedding (one tensor in checkpoints, resharding-proof)."""
    if not has_tied_head_copy(model):
        return
    keep_copy = model.tok_embeddings is None  # else this rank saves the embedding itself, equal to the copy
    value, state = model_sd.pop(HEAD_COPY), optim_sd["state"].pop(HEAD_COPY, None)
    _rename_in_groups(optim_sd, HEAD_COPY, EMBEDDING if keep_copy else None)
    if keep_copy:
        model_sd[EMBEDDING] = value
        if state is not None:
            optim_sd["state"][EMBEDDING] = state


def head_copy_from_checkpoint(model: Llama, model_sd: dict, optim_sd: dict) -> None:
    """In place, the inverse of `head_copy_to_checkpoint` after loading: the copy takes the embedding's values."""
    if not has_tied_head_copy(model):
        return
    if model.tok_embeddings is None:
        model_sd[HEAD_COPY] = model_sd.pop(EMBEDDING)
        if EMBEDDING in optim_sd["state"]:
            optim_sd["state"][HEAD_COPY] = optim_sd["state"].pop(EMBEDDING)
        _rename_in_groups(optim_sd, EMBEDDING, HEAD_COPY)
        return
    model_sd[HEAD_COPY] = model_sd[EMBEDDING]
    if EMBEDDING in optim_sd["state"]:
        optim_sd["state"][HEAD_COPY] = {k: v.clone() for k, v in optim_sd["state"][EMBEDDING].items()}
    for group in optim_sd["param_groups"]:
        if EMBEDDING in group["params"]:
            group["params"].append(HEAD_COPY)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""score(last_stage_output, rows) -> the scalar to backpropagate for those rows of the step's batch."""


class PipelineRunner:
    """Runs one step's micro-batches through this rank's stages with the configured schedule.

    It knows no loss: the caller passes a `score` that turns the last stage's output for some rows of the
    step's batch into the scalar to backpropagate (`llmhpc.train.engine` builds it from an objective). Every
    rank of a pipeline group calls `train_step` / `forward` with the same inputs (all ranks load the batch;
    the first stage feeds the token ids, the last one is scored).
    """

    def __init__(
        self,
        stages: list[StageModule],
        pp_mesh: DeviceMesh,
        schedule: str,
        n_microbatches: int,
        device: torch.device,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleZBVZeroBubble,
        )

        self.stages = {s.index: s for s in stages}
        self.n_stages = stages[0].n_stages
        self.group = pp_mesh.get_group()
        self.pp_rank = pp_mesh.get_local_rank()
        self.holders = [stage_holder(i, pp_mesh.size(), schedule) for i in range(self.n_stages)]
        self.device = device
        self.n_microbatches = n_microbatches
        self._score: Score | None = None
        pipeline_stages = [PipelineStage(s, s.index, s.n_stages, device, group=self.group) for s in stages]
        kwargs = {"n_microbatches": n_microbatches, "loss_fn": self._loss, "scale_grads": False}
        if schedule in ("gpipe", "1f1b"):
            cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            self.schedule = cls(pipeline_stages[0], **kwargs)
        else:
            cls = ScheduleZBVZeroBubble if schedule == "zbv" else ScheduleInterleaved1F1B
            self.schedule = cls(pipeline_stages, **kwargs)

    @property
    def last_stage(self) -> StageModule | None:
        """This rank's last pipeline stage (the one with the final norm and head), if it holds it."""
        return self.stages.get(self.n_stages - 1)

    @property
    def last_stage_rank(self) -> int:
        """Global rank of the process holding the last stage in this pipeline group."""
        return dist.get_global_rank(self.group, self.holders[-1])

    def _loss(self, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        assert self._score is not None, "train_step sets the score before the schedule runs"
        return self._score(output, rows)

    def train_step(self, inputs: dict[str, torch.Tensor], score: Score) -> None:
        """Forward and backward of one optimizer step; gradients are those of the sum of `score`'s results.

        `inputs` holds the step's whole batch for the model's forward (input_ids, and position_ids /
        attention_mask / document_ids when used), rows in micro-batch order; the schedule cuts it into
        n_microbatches. `score(output, rows)` runs on the last stage for every micro-batch, with `rows` the
        indices of its rows in the step's batch. (The schedule's first step also scores a shape-inference
        pass on uninitialized data; a caller that records what `score` sees keeps the last n_microbatches.)
        """
        self._score = score
        rows = torch.arange(inputs["input_ids"].shape[0], device=self.device)
        args = (inputs["input_ids"],) if 0 in self.stages else ()
        kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        target = rows if self.last_stage is not None else None
        try:
            self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
        finally:
            self._score = None

    @torch.no_grad()
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The last stage's output for one batch, forward only, on the rank holding it (None elsewhere).

        The stages run in order, passing activations on; no schedule is involved (torch's ZBV cannot run
        forward-only), so eval batches need not come in groups of n_microbatches. Each hand-over sends the
        activation's shape and dtype first.
        """
        kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        hidden = None
        for index in range(self.n_stages):
            holder = self.holders[index]
            if holder != self.pp_rank:
                continue
            if index == 0:
                hidden = inputs["input_ids"]
            elif self.holders[index - 1] != holder:
                hidden = self._receive(self.holders[index - 1])
            hidden = self.stages[index](hidden, **kwargs)
            if index < self.n_stages - 1 and self.holders[index + 1] != holder:
                self._send(hidden, self.holders[index + 1])
        return hidden if self.last_stage is not None else None

    def _send(self, tensor: torch.Tensor, pp_rank: int) -> None:
        dst = dist.get_global_rank(self.group, pp_rank)
        header = torch.tensor([*tensor.shape, _DTYPES.index(tensor.dtype)], dtype=torch.int64, device=self.device)
        dist.send(header, dst, group=self.group)
        dist.send(tensor.contiguous(), dst, group=self.group)

    def _receive(self, pp_rank: int) -> torch.Tensor:
        src = dist.get_global_rank(self.group, pp_rank)
        header = torch.empty(4, dtype=torch.int64, device=self.device)  # [batch, sequence, dim, dtype]
        dist.recv(header, src, group=self.group)
        *shape, dtype = header.tolist()
        tensor = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
        dist.recv(tensor, src, group=self.group)
        return tensor

    def clip_grad_norm(
        self, params: list[torch.Tensor], max_norm: float, skip_in_norm: tuple[torch.Tensor, ...] = ()
    ) -> torch.Tensor:
        """Clip this rank's gradients to the global norm over all stages (and shards); returns that norm.

        `skip_in_norm`: parameters clipped but not counted (a tied head copy: its matrix counts once).
        """
        from torch.distributed.tensor import DTensor

        counted = [p.grad for p in params if not any(p is q for q in skip_in_norm)]
        norm = torch.nn.utils.get_total_norm(counted)
        if isinstance(norm, DTensor):  # FSDP / TP shards: the norm over the whole stage
            norm = norm.full_tensor()
        squared = norm.pow(2)
        dist.all_reduce(squared, group=self.group)
        total = squared.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total
