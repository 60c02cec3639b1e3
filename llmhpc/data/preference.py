"""Preference data: ranked pairs (prompt, chosen, rejected) → tokens with a loss on the two answers → batches.

The reward-model and DPO stages learn from pairs of answers to one prompt, one of them preferred. Rows are JSONL
lines or Parquet rows in the layouts TRL, Anthropic HH-RLHF and UltraFeedback-binarized use:

- ``prompt`` (a string: one user turn; or a list of messages) with ``chosen`` and ``rejected`` (strings: one
  assistant turn each; or lists of messages, whose last message is the answer);
- no ``prompt``: ``chosen`` and ``rejected`` are whole conversations (message lists) that share every message but
  the last (HH-RLHF's "implicit prompt"); the shared part is the prompt.

Each side is rendered with the model's chat template (`llmhpc.data.chat`) as prompt + answer; only the answer's
tokens (its last assistant turn, end-of-turn marker included) carry the loss, so both sides of a pair are scored
on what differs. Malformed rows are reported with file and line exactly as SFT rows are (`llmhpc.data.sft`), and
`on_error` decides: 'fail' stops at the first, 'skip' leaves it out and counts it. A pair whose two answers are
the same is malformed ('same_pair'): it can teach nothing and only dilutes the batch.

Batches (`pair_batch`): P pairs become 2P right-padded rows, the P chosen answers first, then the P rejected ones
in the same order; ``labels`` are shifted (labels[t] is the token after input_ids[t] where that token belongs to
the answer, IGNORE_INDEX elsewhere). Right padding needs no attention mask: a causal model never looks ahead,
so the padding cannot change a real token's logits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from llmhpc.data.chat import ChatRenderer, Message, RenderError
from llmhpc.data.sft import (
    IGNORE_INDEX,
    ON_ERROR,
    DataReport,
    RowError,
    _check_messages,
    _jsonl_rows,
    _parquet_rows,
    _problem,
    _side,
    sft_files,
)
from llmhpc.errors import InputError

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Side:
    """One rendered answer in its prompt: the tokens and which of them are the answer's."""

    tokens: np.ndarray
    answer: np.ndarray

    @property
    def n_labels(self) -> int:
        """Answer tokens that are predicted (all but a first-position one, which never is)."""
        return int(self.answer[1:].sum())


@dataclass(frozen=True)
class PreferencePair:
    """A validated, tokenized pair: where it comes from ('path, line N'), both sides and a digest of its text."""

    where: str
    chosen: Side
    rejected: Side
    digest: str
    margin: float = 0.0
    """How much better chosen is (the row's optional ``margin``, e.g. a rating difference); the reward model's
    Bradley-Terry loss asks for at least this gap (Llama 2's margin loss), 0 when the row has none."""

    @property
    def length(self) -> int:
        """Positions the longer side fills in a row (its tokens but the last, which is only ever a label)."""
        return max(len(self.chosen.tokens), len(self.rejected.tokens)) - 1


def row_pair(row: Any) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt messages, chosen answer messages, rejected answer messages) of one row; RowError if malformed."""
    if not isinstance(row, dict):
        raise RowError("not_object", f"the row is {type(row).__name__}, not a JSON object")
    if "chosen" not in row or "rejected" not in row:
        raise RowError("no_pair", f"the row has no 'chosen' and 'rejected' ({list(row)})")
    if "prompt" in row:
        prompt = _side(row["prompt"], "user", "prompt")
        chosen, rejected = _side(row["chosen"], "assistant", "chosen"), _side(row["rejected"], "assistant",
                                                                               "rejected")
    else:  # implicit prompt: two conversations that differ in their last message only
        chosen, rejected = _check_messages(row["chosen"], "chosen"), _check_messages(row["rejected"], "rejected")
        if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
            raise RowError("no_pair", "without a 'prompt', 'chosen' and 'rejected' must be conversations that "
                                      "share every message but the last")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[-1]["role"] != "assistant":
            raise RowError("no_assistant", f"the last message of '{name}' is not the assistant's")
    if chosen == rejected:
        raise RowError("same_pair", "'chosen' and 'rejected' are the same answer")
    return prompt, chosen, rejected


def _margin(row: dict) -> float:
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not np.isfinite(margin):
        raise RowError("bad_margin", f"'margin' must be a finite number, got {margin!r}")
    return float(margin)


def render_side(renderer: ChatRenderer, messages: list[Message], seq_len: int, name: str,
                exact: bool = True) -> Side:
    """One side rendered and tokenized, cut after its answer; RowError if it cannot render, has no answer
    tokens or is longer than seq_len + 1 tokens (`exact`: as `ChatRenderer.render`'s)."""
    try:
        rendered = renderer.render(messages, exact=exact)
    except RenderError as e:
        raise RowError("render", f"'{name}': {e}") from None
    mask = np.asarray(rendered.assistant_mask, dtype=bool)
    if not mask[1:].any():
        raise RowError("empty_assistant", f"the '{name}' answer renders to no tokens")
    end = int(np.flatnonzero(mask)[-1]) + 1  # what follows the answer carries no loss and changes nothing before it
    if end - 1 > seq_len:
        raise RowError("too_long", f"'{name}' is {end} tokens, more than seq_len + 1 = {seq_len + 1}")
    return Side(np.asarray(rendered.input_ids[:end], dtype=np.int64), mask[:end])


def _digest(*parts: list[Message]) -> str:
    text = json.dumps([[[m["role"], m["content"]] for m in part] for part in parts], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def load_preference_pairs(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    chat_template: str | None = None,
    on_error: str = "skip",
) -> tuple[list[PreferencePair], DataReport]:
    """Read, validate, render and tokenize every row of `source` (a .jsonl / .parquet file or a directory).

    Returns the pairs in file / line order and a report to log; InputError at the first malformed row with
    on_error='fail', when the tokenizer has no chat template and none is given, or when no row is usable."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    renderer = ChatRenderer(tokenizer, chat_template, last_turn_only=True)
    report = DataReport(label="preference data", unit="pairs")
    pairs = []
    for path in sft_files(source, "preference data"):
        rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _parquet_rows(path, COLUMNS)
        for where, row in rows:
            report.rows += 1
            try:
                if isinstance(row, RowError):
                    raise row
                prompt, chosen, rejected = row_pair(row)
                pairs.append(PreferencePair(where, render_side(renderer, prompt + chosen, seq_len, "chosen"),
                                            render_side(renderer, prompt + rejected, seq_len, "rejected"),
                                            _digest(prompt, chosen, rejected), _margin(row)))
            except RowError as e:
                _problem(report, on_error, where, e)
    report.kept = len(pairs)
    if not pairs:
        raise InputError(f"{source}: no usable preference pair ({report.summary()}; first problem: "
                         f"{report.problems[0] if report.problems else 'the source has no rows'}); fix the data")
    return pairs, report


def pairs_digest(pairs: Sequence[PreferencePair]) -> str:
    """Hex digest of every pair's tokens and answer masks, in order: what a cache of per-pair numbers is keyed on."""
    h = hashlib.sha256()
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            h.update(side.tokens.tobytes() + b"|" + np.packbits(side.answer).tobytes() + b"\0")
    return h.hexdigest()


LAYOUTS = ("labels", "whole", "shared_prefix")
"""How `pair_batch` lays pairs out: 'labels' (DPO: shifted labels on the answers), 'whole' (reward models: every
token of each side in its own row, scored at its last), 'shared_prefix' (reward models: both sides in one row that
holds their common prefix once)."""
POOLINGS = ("last", "sum")
"""Where a reward model reads a side's score (layouts 'whole' and 'shared_prefix'): 'last' at its last token only
(the batch's 'row' / 'last'), 'sum' summed over every token of its answer (also 'answer_tokens')."""


def pair_batch(pairs: Sequence[PreferencePair], pad_id: int, width_multiple: int = 1,
               layout: str = "labels", pooling: str = "last") -> dict[str, torch.Tensor]:
    """A batch of P pairs, right-padded to the longest row rounded up to `width_multiple` (see LAYOUTS).

    'labels': {'input_ids', 'labels'} [2P, W], the chosen sides, then the rejected ones (module docstring).
    'whole' and 'shared_prefix' are scored at each side's last token: they give 'input_ids', 'row' and 'last' [2P]
    (where the side's last token is: the P chosen sides, then the P rejected ones) and 'margin' [P]. 'whole' puts
    every side in a row of its own [2P, W]. 'shared_prefix' puts pair i in row i [P, W] as its sides' common token
    prefix, the rest of chosen, then the rest of rejected, with 'position_ids' (each side's own positions) and a
    4-D 'attention_mask' [P, 1, W, W] under which each side sees the prefix and itself only, so every token
    computes what it computes in its own row while the prefix (prompt and any common start of the answers) is
    computed once: fewer tokens by the prefix length per pair. With pooling='sum' both also give 'answer_tokens'
    [3, T]: for each answer token of each side, the side (0..2P-1), the row and the position it is at."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; choose from {LAYOUTS}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}; choose from {POOLINGS}")
    if layout == "shared_prefix":
        batch = _shared_prefix_batch(pairs, pad_id, width_multiple)
        if pooling == "sum":
            batch["answer_tokens"] = _shared_prefix_answer_tokens(pairs)
        return batch
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if layout == "whole":
        input_ids = torch.full((len(sides), _width(max(len(s.tokens) for s in sides), width_multiple)), pad_id,
                               dtype=torch.long)
        for row, side in enumerate(sides):
            input_ids[row, :len(side.tokens)] = torch.from_numpy(side.tokens)
        batch = {"input_ids": input_ids, "row": torch.arange(len(sides)),
                 "last": torch.tensor([len(s.tokens) - 1 for s in sides]), "margin": _margins(pairs)}
        if pooling == "sum":
            batch["answer_tokens"] = _answer_tokens([(i, i, np.flatnonzero(s.answer)) for i, s in enumerate(sides)])
        return batch
    width = _width(max(len(s.tokens) - 1 for s in sides), width_multiple)
    input_ids = torch.full((len(sides), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sides), width), IGNORE_INDEX, dtype=torch.long)
    for row, side in enumerate(sides):
        n = len(side.tokens) - 1
        tokens = torch.from_numpy(side.tokens)
        input_ids[row, :n] = tokens[:-1]
        labels[row, :n] = torch.where(torch.from_numpy(side.answer[1:]), tokens[1:], IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}


def _width(longest: int, multiple: int) -> int:
    return -(-longest // multiple) * multiple


def _margins(pairs: Sequence[PreferencePair]) -> torch.Tensor:
    return torch.tensor([p.margin for p in pairs], dtype=torch.float32)


def shared_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Tokens `a` and `b` share at their start, at most min(len) - 1 (each side keeps its last token)."""
    n = min(len(a), len(b)) - 1
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def prefix_sharing_mask(segment: torch.Tensor) -> torch.Tensor:
    """The [B, 1, S, S] attention mask of rows that hold one shared prefix and several continuations of it, from
    each position's segment [B, S]: 0 the prefix, k > 0 continuation k, -1 padding. Causal; a continuation sees the
    prefix and itself, never another continuation; a padding position sees only itself (no row of SDPA is empty)."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    visible = ((key == query) | (key == 0)) & (key >= 0)
    return ((causal & visible) | torch.eye(width, dtype=torch.bool))[:, None]


def _shared_prefix_batch(pairs: Sequence[PreferencePair], pad_id: int, width_multiple: int) -> dict[str, torch.Tensor]:
    n_pairs = len(pairs)
    prefixes = [shared_prefix_length(p.chosen.tokens, p.rejected.tokens) for p in pairs]
    lengths = [len(p.chosen.tokens) + len(p.rejected.tokens) - k for p, k in zip(pairs, prefixes, strict=True)]
    width = _width(max(lengths), width_multiple)
    input_ids = torch.full((n_pairs, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n_pairs, width), dtype=torch.long)
    segment = torch.full((n_pairs, width), -1, dtype=torch.long)  # 0 prefix, 1 chosen, 2 rejected, -1 padding
    last = torch.zeros(2 * n_pairs, dtype=torch.long)
    for row, (pair, k, n) in enumerate(zip(pairs, prefixes, lengths, strict=True)):
        chosen, rejected = pair.chosen.tokens, pair.rejected.tokens
        input_ids[row, :n] = torch.from_numpy(np.concatenate([chosen, rejected[k:]]))
        positions[row, :n] = torch.cat([torch.arange(len(chosen)), torch.arange(k, len(rejected))])
        segment[row, :k], segment[row, k:len(chosen)], segment[row, len(chosen):n] = 0, 1, 2
        last[row], last[n_pairs + row] = len(chosen) - 1, n - 1
    return {"input_ids": input_ids, "position_ids": positions, "attention_mask": prefix_sharing_mask(segment),
            "row": torch.arange(n_pairs).repeat(2), "last": last, "margin": _margins(pairs)}


def _answer_tokens(places: Sequence[tuple[int, int, np.ndarray]]) -> torch.Tensor:
    """[3, T] (side, row, position) of each answer token, from (side, row, positions) per side."""
    return torch.from_numpy(np.concatenate(
        [np.stack([np.full(len(positions), side), np.full(len(positions), row), positions]) for side, row, positions
         in places], axis=1).astype(np.int64))


def _shared_prefix_answer_tokens(pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """Where each side's answer tokens sit in `_shared_prefix_batch`'s rows: chosen's where they are, rejected's
    prefix part in the prefix and its rest after chosen's."""
    places = []
    for row, pair in enumerate(pairs):
        k = shared_prefix_length(pair.chosen.tokens, pair.rejected.tokens)
        rejected = np.flatnonzero(pair.rejected.answer)
        places.append((row, row, np.flatnonzero(pair.chosen.answer)))
        places.append((len(pairs) + row, row, np.where(rejected < k, rejected, rejected - k + len(pair.chosen.tokens))))
    return _answer_tokens(places)


def _with_reference(batch: dict[str, torch.Tensor], indices: Sequence[int],
                    reference: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if reference is not None:
        batch["ref_logps"] = reference[list(indices)]
    return batch


class PairLoader:
    """Micro-batches of `pairs_per_batch` pairs for this data-parallel rank, reshuffled every epoch, resumable.

    Epoch e visits the pairs in a permutation drawn from (seed, e); rank r takes every dp_size-th pair of it from
    position r (the epoch's last len % dp_size pairs are left out, so every rank has as many), and a micro-batch
    is the next `pairs_per_batch` of those (an epoch's incomplete last micro-batch is left out too). `reference`
    [N, 2], when given, rides along as each batch's `ref_logps`. The position is (epoch, micro-batch)."""

    def __init__(self, pairs: Sequence[PreferencePair], pairs_per_batch: int, seed: int, *, pad_id: int,
                 dp_rank: int = 0, dp_size: int = 1, reference: torch.Tensor | None = None,
                 width_multiple: int = 1, layout: str = "labels", pooling: str = "last") -> None:
        self.per_rank = len(pairs) // dp_size // pairs_per_batch
        if self.per_rank == 0:
            raise InputError(f"{len(pairs)} preference pairs cannot fill one micro-batch of {pairs_per_batch} pairs "
                             f"on each of {dp_size} data-parallel ranks; add pairs or lower trainer.micro_batch_size")
        self.pairs, self.size, self.seed = list(pairs), pairs_per_batch, seed
        self.pad_id, self.rank, self.ranks, self.reference = pad_id, dp_rank, dp_size, reference
        self.width_multiple, self.layout, self.pooling = width_multiple, layout, pooling
        self.epoch, self.index = 0, 0

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """The pairs this rank trains in `epoch` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.pairs), generator=generator).tolist()
        return order[self.rank::self.ranks][: self.per_rank * self.size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.index == self.per_rank:
            self.epoch, self.index = self.epoch + 1, 0
        indices = self.epoch_indices()[self.index * self.size:(self.index + 1) * self.size]
        self.index += 1
        batch = pair_batch([self.pairs[i] for i in indices], self.pad_id, self.width_multiple, self.layout,
                           self.pooling)
        return _with_reference(batch, indices, self.reference)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "pairs": len(self.pairs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["pairs"] != len(self.pairs):
            raise InputError(f"the checkpoint was trained on {state['pairs']} preference pairs, this data has "
                             f"{len(self.pairs)}; resume with the same data.source or start a new run.dir")
        self.epoch, self.index = state["epoch"], state["index"]


def pair_eval_batches(pairs: Sequence[PreferencePair], pairs_per_batch: int, *, pad_id: int,
                      reference: torch.Tensor | None = None, offset: int = 0,
                      layout: str = "labels", pooling: str = "last") -> list[dict[str, torch.Tensor]]:
    """Every pair in order, `pairs_per_batch` per batch (the last may be smaller); `reference` rows start at
    `offset` (the held-out pairs' place in a reference computed over train + held-out); `layout` and `pooling`
    as pair_batch."""
    batches = []
    for start in range(0, len(pairs), pairs_per_batch):
        indices = range(start, min(start + pairs_per_batch, len(pairs)))
        batch = pair_batch([pairs[i] for i in indices], pad_id, layout=layout, pooling=pooling)
        batches.append(_with_reference(batch, [offset + i for i in indices], reference))
    return batches
