"""Direct preference optimization: the pairwise losses, their objective, and the frozen reference's log-probs.

DPO trains the policy so that, relative to a frozen reference policy, it puts more probability on the chosen
answer of each pair than on the rejected one; no reward model and no sampling. With log-probabilities summed
over each answer's tokens (policy pi, reference ref) and h = (pi_c - ref_c) - (pi_r - ref_r), per pair:

- 'sigmoid' (DPO, Rafailov et al. 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); eps is the
  label smoothing of conservative DPO (the chance a label is flipped), 0 by default;
- 'ipo' (Azar et al. 2023): (h' - 1 / (2 beta))^2, with h' built from per-token MEAN log-probs (as TRL does: the
  squared loss targets a fixed gap, which a sum would tie to the answers' lengths);
- 'hinge' (SLiC, Zhao et al. 2023): max(0, 1 - beta h);
- 'simpo' (Meng et al. 2024, reference-free): -(1 - eps) log sigmoid(beta g - gamma) - eps log sigmoid(-(beta g -
  gamma)), g = mean log-prob of chosen minus that of rejected, gamma the target margin.

Logged per pair: the implicit rewards beta (pi - ref) of each side (for simpo beta times the mean log-prob, its
own reward), their margin, the accuracy (chosen reward > rejected reward) and the policy's log-probs.

The reference's log-probs do not change during training, so they are computed once, before the first step, with
the policy itself (it still holds the starting weights then; under peft=lora its adapters are switched off, so
it is the base exactly): no second model is ever held. They are cached in a file keyed on the starting weights,
the pairs' tokens and the precision, and reused by later epochs, resumes and runs on the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmhpc.data.preference import PreferencePair, pair_batch
from llmhpc.errors import InputError
from llmhpc.rl.grpo import completion_logprobs
from llmhpc.train.losses import IGNORE_INDEX
from llmhpc.train.objective import Batch, LMHead, Metric, Objective, model_inputs

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FREE = ("simpo",)
"""Losses that need no reference log-probs."""


def preference_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
                      loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                      simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) from summed answer log-probs [P] (module docstring).

    `chosen_tokens` / `rejected_tokens` count each answer's tokens (for the per-token means of ipo and simpo);
    the reference tensors are ignored by simpo."""
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r}; choose from {LOSSES}")
    eps = label_smoothing
    if loss in ("ipo", "simpo"):
        chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens
        ref_chosen, ref_rejected = ref_chosen / chosen_tokens, ref_rejected / rejected_tokens
    if loss == "simpo":
        reward_c, reward_r = beta * chosen, beta * rejected
        z = reward_c - reward_r - simpo_gamma
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), reward_c, reward_r
    reward_c, reward_r = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)
    return losses, reward_c, reward_r


def answer_logprob_sums(head: LMHead, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's answer tokens [B], answer tokens per row [B]); the head runs on answer
    positions only."""
    logprobs = completion_logprobs(head, hidden, labels, 1.0)
    return logprobs.sum(-1), (labels != IGNORE_INDEX).sum(-1)


class DPOObjective(Objective):
    """The preference loss of a batch of pairs (`llmhpc.data.preference.pair_batch`: P chosen rows, then the P
    rejected ones), plus `ref_logps` [P, 2] (reference log-prob sums of chosen, rejected) unless reference-free.
    The unit is a pair: the step's loss is the mean over its pairs."""

    name = "dpo"

    def __init__(self, *, loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}; choose from {LOSSES}")
        self.options = {"loss": loss, "beta": beta, "label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma}

    def normalizer(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, head: LMHead, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, Metric]]:
        sums, tokens = answer_logprob_sums(head, hidden, batch["labels"])
        pairs = sums.shape[0] // 2
        chosen, rejected = sums[:pairs], sums[pairs:]
        if self.options["loss"] in REFERENCE_FREE:
            ref = torch.zeros(pairs, 2, dtype=sums.dtype, device=sums.device)
        else:
            ref = batch["ref_logps"].to(sums.dtype)
        losses, reward_c, reward_r = preference_losses(
            chosen, rejected, ref[:, 0], ref[:, 1], tokens[:pairs].to(sums.dtype), tokens[pairs:].to(sums.dtype),
            **self.options)
        count = torch.tensor(float(pairs), device=sums.device)
        reward_c, reward_r = reward_c.detach(), reward_r.detach()
        metrics = {
            "reward_chosen": (reward_c.sum(), count), "reward_rejected": (reward_r.sum(), count),
            "reward_margin": ((reward_c - reward_r).sum(), count),
            "reward_accuracy": ((reward_c > reward_r).to(sums.dtype).sum(), count),
            "logps_chosen": (chosen.detach().sum(), count), "logps_rejected": (rejected.detach().sum(), count),
        }
        return losses.sum(), metrics


@torch.no_grad()
def reference_logprobs(model: nn.Module, pairs: Sequence[PreferencePair], *, pairs_per_batch: int, pad_id: int,
                       device: torch.device, context: Callable[[], AbstractContextManager] = nullcontext,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Summed answer log-probs [N, 2] (chosen, rejected) of every pair under `model` as it is now, float64.

    Every rank computes every pair (the same forwards on each rank, so FSDP2's collectives line up); under FSDP2
    the parameters are gathered once for the whole pass."""
    from llmhpc.parallel.fsdp import parameters_gathered

    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with parameters_gathered(model):
            for start in range(0, len(pairs), pairs_per_batch):
                chunk = pairs[start:start + pairs_per_batch]
                batch = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
                with context():
                    hidden = model(**model_inputs(batch), return_hidden=True)
                    sums, _ = answer_logprob_sums(LMHead(model), hidden, batch["labels"])
                out[start:start + len(chunk)] = sums.double().view(2, -1).t().cpu()
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return out


def reference_key(start: dict, pairs_digest: str, precision: str) -> str:
    """What a cached reference depends on: the starting weights' fingerprint, the pairs' tokens, the precision."""
    text = json.dumps({"start": start, "pairs": pairs_digest, "precision": precision, "version": 1}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load_cached_reference(path: Path, key: str, n_pairs: int) -> torch.Tensor | None:
    """The cached [N, 2] log-probs at `path` if it was written for `key` (else None: recompute)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            values = f.get_tensor("ref_logps")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: the cached reference log-probs cannot be read ({e}); delete the file") from None
    return values if values.shape == (n_pairs, 2) else None


def save_cached_reference(path: Path, key: str, values: torch.Tensor) -> None:
    """Write the cache atomically (a reader sees no file or the whole of it)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({"ref_logps": values.contiguous()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
