"""Engines: how one optimizer step of an objective runs on a laid-out model.

The trainer owns the loop (schedule, accumulation bookkeeping, the non-finite guard, eval, logging,
checkpoints); an engine owns what differs between parallel backends:

- `LocalEngine`: one process, FSDP2 / DDP / HSDP and tensor parallel. The model is called directly; FSDP
  and TP do their communication in hooks, and loss parallel wraps the objective and its backward.
- `PipelineEngine`: pipeline parallel. The schedule runs the stages; the objective runs on the last stage's
  output, and the other ranks receive the step's sums from it.
- `DeepSpeedStepEngine`: DeepSpeed ZeRO-1/2/3. The objective runs inside the model's forward (where ZeRO-3
  has the head's weight gathered), and DeepSpeed reduces, clips and steps.

Every engine backpropagates `loss_sum / normalizer * dp_size` per micro-batch, where normalizer is the
objective's unit count over the whole step and every data-parallel rank: data parallelism averages
gradients over dp ranks, so the result is the gradient of the global mean. `StepSums` carries the
micro-batch sums of the loss and the metrics, local to this data-parallel rank; the trainer reduces them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from llmhpc.train.objective import LMHead, Metric, Objective, model_inputs
from llmhpc.train.reduce import DataParallelReducer

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from torch.distributed.device_mesh import DeviceMesh

    from llmhpc.parallel.pipeline import PipelineRunner

Batch = dict[str, torch.Tensor]


@dataclass
class StepSums:
    """Sums over some micro-batches on this data-parallel rank: the loss, and each metric's (sum, count).

    Kept as fp32 tensors on the compute device (no host sync per micro-batch); a loss-parallel loss (a
    replicated DTensor) is made plain first.
    """

    loss: torch.Tensor | None = None
    metrics: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, loss: torch.Tensor, metrics: dict[str, Metric]) -> None:
        value = DataParallelReducer.full(loss).detach().float()
        self.loss = value if self.loss is None else self.loss + value
        for name, (total, count) in metrics.items():
            pair = [
                DataParallelReducer.full(torch.as_tensor(v, device=value.device)).detach().float()
                for v in (total, count)
            ]
            old = self.metrics.get(name)
            self.metrics[name] = pair if old is None else [a + b for a, b in zip(old, pair, strict=True)]

    def flat(self) -> tuple[list[str], torch.Tensor]:
        """(metric names, [loss, sum_1, count_1, ...]) for one collective."""
        assert self.loss is not None, "no micro-batch was added"
        names = sorted(self.metrics)
        values = [self.loss] + [v for name in names for v in self.metrics[name]]
        return names, torch.stack([v.reshape(()) for v in values])

    @classmethod
    def unflat(cls, names: list[str], values: torch.Tensor) -> StepSums:
        out = cls(values[0])
        for i, name in enumerate(names):
            out.metrics[name] = [values[1 + 2 * i], values[2 + 2 * i]]
        return out


class Engine(ABC):
    """Runs an objective's forward and backward on a laid-out model and applies the optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: DataParallelReducer,
        autocast: Callable[[], AbstractContextManager],
        after_optimizer_step: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        """The model as checkpoints see it (parameter names are checkpoint keys)."""
        self.optimizer = optimizer
        self.dp = dp
        self.autocast = autocast
        self.after_optimizer_step = after_optimizer_step
        """Called after every applied optimizer step, and once before the first (e.g. float8 weight scales)."""

    @abstractmethod
    def forward_backward(self, micro: list[Batch], objective: Objective, normalizer: int) -> StepSums:
        """Accumulate the gradients of one step's micro-batches; returns this rank's sums."""

    @abstractmethod
    def forward(self, batch: Batch, objective: Objective) -> StepSums:
        """This rank's sums of one batch, without gradients (eval)."""

    def lr_groups(self) -> list[dict[str, Any]]:
        """The optimizer param groups whose 'lr' the schedule sets."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self, max_norm: float) -> float:
        """Clip the gradients to `max_norm` (global norm over all ranks); returns the norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        return float(self.dp.full(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    def update(self, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
        """Clip and step unless the loss or the gradient norm is not finite; returns (norm, stepped)."""
        norm = self.grad_norm(max_norm)
        stepped = loss_finite and math.isfinite(norm)
        if stepped:
            self.optimizer.step()
            if self.after_optimizer_step is not None:
                self.after_optimizer_step()
        else:
            self.zero_grad()
        return norm, stepped

    def checkpoint_converters(self) -> dict:
        """How checkpoints read and write this engine's model and optimizer (torch's default: none needed)."""
        return {}

    def close(self) -> None:  # noqa: B027 - most engines hold nothing to release
        """Release what the engine holds (DeepSpeed's engine must go before its process group)."""


class LocalEngine(Engine):
    """One process, FSDP2 / DDP / HSDP, tensor parallel: the objective calls the model directly."""

    def __init__(self, *args, loss_context: Callable[[], AbstractContextManager] = nullcontext, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_context = loss_context
        """`loss_parallel()` when the logits stay vocabulary-sharded: the loss and its backward run inside it."""

    def forward_backward(self, micro: list[Batch], objective: Objective, normalizer: int) -> StepSums:
        sums = StepSums()
        for batch in micro:
            with self.loss_context():
                with self.autocast():
                    out = objective(self.model, batch)
                (out.loss / max(normalizer, 1) * self.dp.size).backward()  # "* 1": one process stays bitwise
            sums.add(out.loss, out.metrics)
        return sums

    @torch.no_grad()
    def forward(self, batch: Batch, objective: Objective) -> StepSums:
        sums = StepSums()
        with self.loss_context(), self.autocast():
            out = objective(self.model, batch)
        sums.add(out.loss, out.metrics)
        return sums


class PipelineEngine(Engine):
    """Pipeline parallel: the schedule runs the stages, the objective scores the last stage's output.

    Every rank of a pipeline group loads the same batch. The objective runs where the last stage is, on
    each micro-batch's rows; the step's sums are then broadcast to the other ranks of the pipeline group,
    so every rank logs, guards and checkpoints alike.
    """

    def __init__(self, *args, runner: PipelineRunner, mesh: DeviceMesh, **kwargs) -> None:
        from llmhpc.parallel.pipeline import TiedHeadSync, has_tied_head_copy

        super().__init__(*args, **kwargs)
        self.runner = runner
        self.tied = TiedHeadSync(self.model, mesh, runner.holders) if self.model.cfg.tie_embeddings else None
        """Tied embeddings: the last stage's head copy and the embedding get the sum of both gradients."""
        self.head_copy = (self.model.output.weight,) if has_tied_head_copy(self.model) else ()

    def _sums_from_last_stage(self, sums: StepSums | None) -> StepSums:
        """The last stage holder's sums, on every rank of the pipeline group."""
        box = [sums.flat() if sums is not None else None]
        dist.broadcast_object_list(box, src=self.runner.last_stage_rank, group=self.runner.group)
        names, values = box[0]
        return StepSums.unflat(names, values)

    def forward_backward(self, micro: list[Batch], objective: Objective, normalizer: int) -> StepSums:
        whole = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
        scale = self.dp.size / max(normalizer, 1)
        head = LMHead(self.runner.last_stage) if self.runner.last_stage is not None else None
        seen: list[tuple[torch.Tensor, dict[str, Metric]]] = []

        def score(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            loss, metrics = objective.loss(head, hidden, {key: value[rows] for key, value in whole.items()})
            seen.append((loss.detach(), {k: (s.detach(), c) for k, (s, c) in metrics.items()}))
            return loss * scale

        with self.autocast():
            self.runner.train_step(model_inputs(whole), score)
        if self.tied is not None:
            self.tied.all_reduce_grads()
        sums = None
        if head is not None:
            sums = StepSums()
            # The schedule's first step also scores a shape-inference pass (on uninitialized data): keep the real ones.
            for loss, metrics in seen[-len(micro) :]:
                sums.add(loss, metrics)
        return self._sums_from_last_stage(sums)

    def forward(self, batch: Batch, objective: Objective) -> StepSums:
        with torch.no_grad(), self.autocast():
            hidden = self.runner.forward(model_inputs(batch))
            sums = None
            if hidden is not None:
                sums = StepSums()
                sums.add(*objective.loss(LMHead(self.runner.last_stage), hidden, batch))
        return self._sums_from_last_stage(sums)

    def grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        # global over the pipeline's stages too; a tied head copy's gradient equals the embedding's: count it once
        return float(self.runner.clip_grad_norm(params, max_norm, skip_in_norm=self.head_copy))

    def checkpoint_converters(self) -> dict:
        """Torch's state dicts, with a tied head copy saved as (and loaded from) the embedding it copies."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from llmhpc.checkpoint.manager import set_torch_states
        from llmhpc.parallel.pipeline import head_copy_from_checkpoint, head_copy_to_checkpoint

        if not self.head_copy:
            return {}

        def get_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            head_copy_to_checkpoint(model, model_sd, optim_sd)
            return model_sd, optim_sd

        def set_states(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
            head_copy_from_checkpoint(model, model_sd, optim_sd)
            set_torch_states(model, optimizer, model_sd, optim_sd)

        return {"get_states": get_states, "set_states": set_states}


class DeepSpeedStepEngine(Engine):
    """DeepSpeed ZeRO: the objective runs inside the model's forward, DeepSpeed reduces, clips and steps.

    `on_hidden` hands the objective the final hidden states inside `Llama.forward`, where ZeRO-3 has every
    weight the forward uses gathered (the head's weight is registered as an external parameter of the model
    by `llmhpc.parallel.deepspeed.wrap_with_deepspeed`). DeepSpeed skips the update when the gradient norm
    is not finite, as the trainer's guard does.
    """

    def __init__(self, *args, ds_engine: DeepSpeedEngine, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ds_engine = ds_engine

    def _run(self, batch: Batch, objective: Objective) -> tuple[torch.Tensor, dict[str, Metric]]:
        head = LMHead(self.model)
        with self.autocast():
            return self.ds_engine(
                **model_inputs(batch), on_hidden=lambda hidden: objective.loss(head, hidden, batch)
            )

    def forward_backward(self, micro: list[Batch], objective: Objective, normalizer: int) -> StepSums:
        from llmhpc.parallel import deepspeed as ds

        sums = StepSums()
        for batch in micro:
            loss, metrics = self._run(batch, objective)
            ds.backward(self.ds_engine, loss / max(normalizer, 1) * self.dp.size)
            sums.add(loss, metrics)
        return sums

    @torch.no_grad()
    def forward(self, batch: Batch, objective: Objective) -> StepSums:
        sums = StepSums()
        sums.add(*self._run(batch, objective))
        return sums

    def lr_groups(self) -> list[dict[str, Any]]:
        return self.ds_engine.optimizer.param_groups

    def zero_grad(self) -> None:
        """DeepSpeed clears its gradients when it steps."""

    def update(self, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
        from llmhpc.parallel import deepspeed as ds

        norm = ds.step(self.ds_engine)  # clips to the configured grad_clip, skips a non-finite step itself
        return norm, loss_finite and math.isfinite(norm)

    def checkpoint_converters(self) -> dict:
        from llmhpc.parallel import deepspeed as ds

        engine = self.ds_engine
        return {
            "get_states": lambda model, optimizer: ds.engine_state_dicts(engine, model),
            "set_states": lambda model, optimizer, msd, osd: ds.load_engine_state_dicts(engine, model, msd, osd),
        }

    def close(self) -> None:
        self.ds_engine.destroy()
