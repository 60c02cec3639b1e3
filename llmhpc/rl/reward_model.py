"""Reward models: the Bradley-Terry objective that trains one from ranked pairs, and the scorer that uses it.

A reward model is the policy's backbone with a scalar head (`ModelConfig.score_head`): the score of a sequence
is the head's value at its last token, r = w . h_last, or with `reward_model.pooling=sum` the head's values summed
over the answer's tokens, r = sum_t w . h_t. Trained on pairs (chosen preferred over rejected), the
Bradley-Terry model says P(chosen > rejected) = sigmoid(r_c - r_r), so per pair the loss is

    -log sigmoid(r_c - r_r - m)  +  c (r_c + r_r)^2

with m the pair's margin (0 unless the data gives one: Llama 2's margin loss for graded preferences) and c the
reward-centering coefficient (0 by default; Eisenstein et al. 2023: keeps the scores near mean zero, which the
pairwise loss alone leaves free, so they are comparable across prompts). Logged per pair: the loss, the accuracy
(r_c > r_r), both scores and their gap.

`RewardScorer` loads a trained reward model (an llmhpc run or checkpoint) and scores prompt / answer pairs
rendered with the chat template: a reward for PPO, for `llmhpc eval` and for best-of-n sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llmhpc.train.objective import Batch, LMHead, Metric, Objective

if TYPE_CHECKING:
    from llmhpc.data.preference import Side


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                         center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair loss [P] from the scores of chosen and rejected [P] (module docstring)."""
    gap = chosen - rejected if margin is None else chosen - rejected - margin
    losses = -F.logsigmoid(gap)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def side_scores(head: LMHead, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each side's score [2P] (`pair_batch`'s chosen sides, then its rejected ones): the head summed over the
    side's answer tokens where the batch has 'answer_tokens' (pooling 'sum'), else the head at its last token
    ('row' / 'last'); only those positions go through the head."""
    if "answer_tokens" not in batch:
        return head.scores(hidden[batch["row"].to(hidden.device), batch["last"].to(hidden.device)])
    side, row, position = batch["answer_tokens"].to(hidden.device)
    values = head.scores(hidden[row, position])
    return values.new_zeros(batch["last"].shape[0]).index_add(0, side, values)


class RewardObjective(Objective):
    """The Bradley-Terry loss of a batch of pairs (`pair_batch` layout 'whole' or 'shared_prefix', each side scored
    by `side_scores`: at its last token, or summed over its answer). The unit is a pair: the step's loss is the
    mean over its pairs."""

    name = "reward"

    def __init__(self, *, center_coefficient: float = 0.0) -> None:
        self.center_coefficient = center_coefficient

    def normalizer(self, batch: Batch) -> int:
        return batch["last"].shape[0] // 2

    def loss(self, head: LMHead, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, Metric]]:
        scores = side_scores(head, hidden, batch)
        pairs = scores.shape[0] // 2
        chosen, rejected = scores[:pairs], scores[pairs:]
        margin = batch["margin"].to(scores.device, scores.dtype)
        losses = bradley_terry_losses(chosen, rejected, margin, self.center_coefficient)
        count = torch.tensor(float(pairs), device=scores.device)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": ((chosen > rejected).to(scores.dtype).sum(), count),
            "score_chosen": (chosen.sum(), count), "score_rejected": (rejected.sum(), count),
            "score_gap": ((chosen - rejected).sum(), count),
        }
        return losses.sum(), metrics


class RewardScorer:
    """A reward model that scores answers: `scorer(prompts, answers)` -> one float per answer.

    Each (prompt, answer) is rendered with the chat template as a user turn and an assistant turn, exactly as a
    training pair's side, and scored as the model was trained (`pooling`: at its last token, or summed over the
    answer's tokens); rows go `batch_size` at a time, right-padded (a causal model's real tokens never see the
    padding). `RewardScorer.load(path)` reads a trained reward model and how it pools."""

    def __init__(self, model, tokenizer, *, chat_template: str | None = None, batch_size: int = 8,
                 pooling: str = "last", device: str | None = None, dtype: torch.dtype = torch.float32,
                 offload: bool = False) -> None:
        """`device`: where the model scores (default: where its weights are); `dtype`: bf16 stores its linear
        layers in bf16 and scores under bf16 autocast; `offload`: keep it in host memory between calls
        (`llmhpc.rl.frozen.FrozenModel`)."""
        from llmhpc.data.chat import ChatRenderer
        from llmhpc.data.preference import POOLINGS
        from llmhpc.errors import InputError
        from llmhpc.rl.frozen import FrozenModel

        if getattr(model, "score", None) is None:
            raise InputError("not a reward model (it has no score head); train one with `llmhpc reward`")
        if pooling not in POOLINGS:
            raise InputError(f"pooling={pooling!r} is not one of: {', '.join(POOLINGS)}")
        self.frozen = FrozenModel(model, device or model.tok_embeddings.weight.device, dtype=dtype, offload=offload)
        self.model, self.pooling = self.frozen.model, pooling
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.renderer = ChatRenderer(tokenizer, chat_template, last_turn_only=True)
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path, *, tokenizer: str | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32, **options) -> RewardScorer:
        """The reward model at `path` (an llmhpc run or checkpoint) with the tokenizer it trained with."""
        from llmhpc.data.tokenizer import load_tokenizer
        from llmhpc.errors import InputError
        from llmhpc.models import load_pretrained
        from llmhpc.models.loader import tokenizer_spec

        model, _ = load_pretrained(str(path))
        if model.score is None:
            raise InputError(f"{path}: not a reward model (it has no score head); train one with `llmhpc reward`")
        options.setdefault("pooling", stored_pooling(path))
        return cls(model, load_tokenizer(tokenizer or tokenizer_spec(path) or "smollm2"), device=device,
                   dtype=dtype, **options)

    def side(self, prompt: str | list[dict], answer: str) -> Side:
        """The rendered conversation through the end of the answer's turn, as a training pair's side
        (`llmhpc.data.preference.Side`: its tokens and which are the answer's); the prompt is one user turn or a
        list of messages. Any answer renders, also one whose first token would merge across the turn boundary
        (a sampled answer may start with spaces): its turns are then tokenized one by one."""
        from llmhpc.data.preference import render_side

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages.append({"role": "assistant", "content": answer})
        return render_side(self.renderer, messages, self.model.cfg.max_seq_len, "answer", exact=False)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str | list[dict]], answers: Sequence[str]) -> list[float]:
        sides = [self.side(p, a) for p, a in zip(prompts, answers, strict=True)]
        with self.frozen.resident(), self.frozen.autocast():
            return self._scores(sides)

    def _scores(self, sides: list[Side]) -> list[float]:
        device = self.frozen.device
        scores: list[float] = []
        for start in range(0, len(sides), self.batch_size):
            chunk = sides[start:start + self.batch_size]
            ids = torch.full((len(chunk), max(len(s.tokens) for s in chunk)), self.pad, dtype=torch.long)
            pooled = torch.zeros(ids.shape)  # where each row's score is read (1) and summed
            for i, side in enumerate(chunk):
                ids[i, :len(side.tokens)] = torch.from_numpy(side.tokens)
                if self.pooling == "sum":
                    pooled[i, :len(side.tokens)] = torch.from_numpy(side.answer)
                else:
                    pooled[i, len(side.tokens) - 1] = 1
            values = self.model.score_values(self.model(ids.to(device), return_hidden=True))
            scores += (values * pooled.to(values.device)).sum(dim=1).tolist()
        return scores

    def pairwise(self, rows: Sequence[dict]) -> dict[str, float]:
        """{'accuracy': share of rows whose chosen scores above rejected, 'gap': mean chosen - rejected score} of
        rows with string prompt / chosen / rejected."""
        prompts = [r["prompt"] for r in rows]
        chosen, rejected = self(prompts, [r["chosen"] for r in rows]), self(prompts, [r["rejected"] for r in rows])
        gaps = [c - r for c, r in zip(chosen, rejected, strict=True)]
        return {"accuracy": sum(g > 0 for g in gaps) / len(gaps), "gap": sum(gaps) / len(gaps)}


def stored_pooling(path: str | Path) -> str:
    """How the reward model at `path` reads its scores (its run's `reward_model.pooling`); 'last' for a model
    that is not an llmhpc checkpoint."""
    from llmhpc.models.loader import run_config

    config = run_config(path)
    return config.reward_model.pooling if config is not None else "last"
