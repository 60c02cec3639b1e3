"""Objectives: what a stage trains for, kept apart from how a step runs on a parallel layout.

An objective sees the model only through its final hidden states and an `LMHead` (the output projection
with the operations losses need: logits, the fused cross entropy, per-token log-probs). It never calls
the model itself. That split is what lets one objective run unchanged on every engine: one process,
FSDP2 / DDP / HSDP, tensor parallel (the head's logits may be vocabulary-sharded under loss parallel),
pipeline parallel (only the last stage has the head and runs the objective; the other stages pass
activations) and DeepSpeed (under ZeRO-3 the objective runs inside the model's forward, where the head's
weight is gathered). The engines live in `llmhpc.train.engine`.

Losses are returned as SUMS over the units they are normalized by, and `normalizer(batch)` counts those
units from the batch alone (labelled tokens, sequences, pairs: the objective decides). The engine adds up
the normalizer over every micro-batch of the step and every data-parallel rank before any backward, so
the gradient is that of the global mean, exactly as one big batch on one process would give it. Metrics
are (sum, count) pairs reduced the same way, so the logged value is the global mean of each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from llmhpc.train.losses import IGNORE_INDEX, linear_cross_entropy_sum, token_cross_entropy_sum

Batch = dict[str, torch.Tensor]

MODEL_INPUTS = ("position_ids", "attention_mask", "document_ids")
"""Batch fields the model's forward takes besides input_ids, when a batch carries them."""


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """Keyword arguments of the model's forward for `batch`: input_ids and the MODEL_INPUTS the batch carries (a
    layout with its own positions and mask, e.g. shared prefixes, is computed right only with them)."""
    inputs = {"input_ids": batch["input_ids"]}
    inputs.update({key: batch[key] for key in MODEL_INPUTS if key in batch})
    return inputs


class LMHead:
    """The output projection of a model (or of a pipeline's last stage), as objectives use it.

    `module` is anything with `logits(hidden)` and `lm_head_weight()`: the `Llama`, a pipeline
    `StageModule`, or a DeepSpeed engine's module. Under tensor parallel with loss parallel the logits are
    a vocabulary-sharded DTensor, and the caller runs forward and backward inside `loss_parallel()`.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def weight(self) -> torch.Tensor:
        """The [vocab, dim] matrix the logits multiply by."""
        return self.module.lm_head_weight()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states (full, or vocabulary-sharded under loss parallel)."""
        return self.module.logits(hidden)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The scalar head's value at every position [B, S] (a reward model's `score`), fp32."""
        return self.module.score_values(hidden)

    def cross_entropy_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross entropy of `labels` (IGNORE_INDEX excluded), in fp32.

        A plain head matrix takes the fused LM-head loss (no full logits in memory); a sharded one (a DTensor
        under tensor parallel) goes through its logits.
        """
        weight = self.weight()
        if type(weight.data) is torch.Tensor:
            return linear_cross_entropy_sum(hidden, weight, labels)[0]
        return token_cross_entropy_sum(self.logits(hidden), labels)[0]

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) at every position (0 where the target is IGNORE_INDEX), fp32, with gradient;
        computed chunk by chunk so the full logits never exist at once. A plain head matrix takes the fused
        path (its own matmuls, one kept logits buffer); a sharded or wrapped head goes through its logits."""
        from llmhpc.train.logprobs import linear_token_logprobs, token_logprobs

        weight = self.weight()
        if type(weight.data) is torch.Tensor:
            return linear_token_logprobs(hidden, weight, targets)
        return token_logprobs(hidden, self.logits, targets)


Metric = tuple[torch.Tensor, torch.Tensor]
"""(sum, count) of a named metric over a micro-batch; its logged value is sum / count over the whole step."""


@dataclass
class ObjectiveOutput:
    """What an objective returns for one micro-batch."""

    loss: torch.Tensor
    """The loss summed over the batch's units (a scalar with gradient)."""
    count: int
    """How many units `loss` sums over (the objective's `normalizer` of the batch)."""
    metrics: dict[str, Metric] = field(default_factory=dict)
    """Named metrics as (sum, count) pairs, reduced over micro-batches and ranks like the loss."""


class Objective(ABC):
    """A training objective. Subclasses define `normalizer` and `loss`; everything else is shared."""

    name: str = "objective"
    """Short name, for logs."""

    @abstractmethod
    def normalizer(self, batch: Batch) -> int:
        """Units the loss of `batch` is a sum over (known from the batch alone, before any forward)."""

    @abstractmethod
    def loss(self, head: LMHead, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, Metric]]:
        """(summed loss, metrics) of `batch` from the model's final hidden states [B, S, dim]."""

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Forward `model` (a plain or FSDP/DDP/TP-wrapped `Llama`) on `batch` and score it."""
        hidden = model(**model_inputs(batch), return_hidden=True)
        loss, metrics = self.loss(LMHead(model), hidden, batch)
        return ObjectiveOutput(loss, self.normalizer(batch), metrics)


class NextTokenObjective(Objective):
    """Next-token cross entropy over the labelled tokens (pretraining; SFT with prompt tokens masked out)."""

    name = "next_token"

    def normalizer(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, head: LMHead, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, Metric]]:
        return head.cross_entropy_sum(hidden, batch["labels"]), {}


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed next-token loss, labelled tokens) of `model` on `batch`: the pretraining objective in one call."""
    out = NextTokenObjective()(model, batch)
    return out.loss, out.count


def labelled_tokens(batch: Batch) -> int:
    """Tokens of `batch` that carry a next-token loss (labels not IGNORE_INDEX); 0 for a batch without labels."""
    labels = batch.get("labels")
    return int((labels != IGNORE_INDEX).sum()) if labels is not None else 0


def processed_tokens(batch: Batch) -> int:
    """Tokens a forward of `batch` really processes (padding excluded), for throughput."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()
