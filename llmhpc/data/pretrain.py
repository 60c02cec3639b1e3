"""Serve packed pretraining batches from a prepared corpus, resumably.

The prepared token stream (see ``prepare.py``) is cut into fixed windows of seq_len + 1 tokens;
each epoch visits every window once in a seeded order. The loader's whole position is two ints
(epoch, index), so a checkpoint can store it and a restored loader yields exactly the batches
the original would have, which exact resume depends on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmhpc.data.prepare import META_FILE
from llmhpc.errors import InputError

_REPREPARE = "delete the directory and prepare the corpus again (llmhpc data prepare)"


class PackedTokens:
    """One split (train / val) of a prepared corpus, memory-mapped read-only."""

    def __init__(self, path: Path, split: str) -> None:
        self.path = Path(path)
        self.split = split
        meta_file = self.path / META_FILE
        if not meta_file.exists():
            raise FileNotFoundError(
                f"{meta_file}: not found, so {self.path} is not a complete prepared corpus; "
                "prepare it with llmhpc data prepare"
            )
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
            dtype = np.dtype(self.meta["dtype"])
            n_tokens = int(self.meta[f"{split}_tokens"])
            self.separator_id = int(self.meta["separator_id"])
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InputError(f"{meta_file}: not a prepared-corpus meta.json ({type(e).__name__}: {e}); "
                             f"{_REPREPARE}") from None
        bin_file = self.path / f"{split}.bin"
        if not bin_file.is_file() or bin_file.stat().st_size != n_tokens * dtype.itemsize:
            raise InputError(f"{bin_file}: missing or not the {n_tokens} tokens meta.json promises; {_REPREPARE}")
        self.tokens: np.ndarray = (
            np.memmap(bin_file, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def n_windows(self, seq_len: int) -> int:
        """Non-overlapping windows of seq_len + 1 tokens (stride seq_len) in this split."""
        return max(0, (len(self.tokens) - 1) // seq_len)

    def windows(self, starts: np.ndarray, seq_len: int) -> np.ndarray:
        """Token windows [len(starts), seq_len + 1] as int64, window i beginning at starts[i] * seq_len."""
        index = np.asarray(starts, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
        return np.asarray(self.tokens[index], dtype=np.int64)


def _require_windows(tokens: PackedTokens, seq_len: int) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = tokens.n_windows(seq_len)
    if n == 0:
        raise InputError(
            f"{tokens.path}: the '{tokens.split}' split has {len(tokens)} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; use a larger corpus (or data.val_fraction) or a shorter trainer.seq_len"
        )
    return n


def make_batch(windows: np.ndarray, separator_id: int, document_masking: bool) -> dict[str, torch.Tensor]:
    """Batch dict from int64 windows [B, S + 1]: input_ids, labels (next tokens), document_ids if asked.

    document_ids count the separators before each position, so a separator belongs to the document
    it ends and the next token starts a new id.
    """
    inputs = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    batch = {"input_ids": inputs, "labels": torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))}
    if document_masking:
        is_sep = (inputs == separator_id).long()
        batch["document_ids"] = torch.cumsum(is_sep, dim=1) - is_sep
    return batch


class PretrainLoader:
    """Endless, seeded, resumable stream of packed batches from one split, sliced by data-parallel rank."""

    def __init__(
        self,
        tokens: PackedTokens,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        document_masking: bool = False,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.document_masking = document_masking
        self.n_windows = _require_windows(tokens, seq_len)
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch; an epoch that ends inside it continues with the next epoch's order.

        Every call advances the shared stream by micro_batch_size x dp_size windows and this rank
        keeps its own consecutive slice of them, so the dp ranks together read exactly the windows
        one process would read for the same global batch, and (epoch, index) is the same on all ranks.
        """
        starts = np.empty(self.micro_batch_size, dtype=np.int64)
        first = self.dp_rank * self.micro_batch_size
        for i in range(self.micro_batch_size * self.dp_size):
            if self.index == self.n_windows:
                self.epoch += 1
                self.index = 0
            if first <= i < first + self.micro_batch_size:
                starts[i - first] = self._epoch_order()[self.index]
            self.index += 1
        windows = self.tokens.windows(starts, self.seq_len)
        return make_batch(windows, self.tokens.separator_id, self.document_masking)

    def state_dict(self) -> dict[str, int]:
        """Position of the stream as plain ints, for checkpoints."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a state_dict() of a loader over the same data, seed and seq_len."""
        for key in ("seed", "seq_len", "n_windows"):
            if int(state[key]) != getattr(self, key):
                raise InputError(
                    f"{self.tokens.path}: the checkpoint's data position has {key}={state[key]} but this data "
                    f"gives {getattr(self, key)}; resume with the same data, run.seed and trainer.seq_len, "
                    "or start a new run.dir"
                )
        if not 0 <= int(state["index"]) <= self.n_windows or int(state["epoch"]) < 0:
            raise ValueError(f"loader state out of range: {state}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])


class RandomWindowLoader:
    """Each data-parallel rank draws its windows on its own, uniformly with replacement (`data.sampling=random`).

    Unlike `PretrainLoader`'s shared epoch order, no rank knows what the others read: every rank's generator
    is seeded with (seed, dp rank) and its state is that rank's data position, which checkpoints keep per
    rank. Useful for very large corpora where epochs are meaningless, and the way RL prompt samplers work.
    """

    def __init__(
        self,
        tokens: PackedTokens,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        document_masking: bool = False,
        dp_rank: int = 0,
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.document_masking = document_masking
        self.n_windows = _require_windows(tokens, seq_len)
        self.rng = np.random.default_rng([seed, dp_rank])

    def next_batch(self) -> dict[str, torch.Tensor]:
        starts = self.rng.integers(0, self.n_windows, self.micro_batch_size)
        return make_batch(self.tokens.windows(starts, self.seq_len), self.tokens.separator_id, self.document_masking)

    def state_dict(self) -> dict:
        """This rank's generator state (plain JSON: PCG64's state is two big ints)."""
        return {"sampling": "random", "seq_len": self.seq_len, "n_windows": self.n_windows,
                "bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling") != "random" or state["n_windows"] != self.n_windows:
            raise InputError(
                f"{self.tokens.path}: the checkpoint's data position is not one of data.sampling=random over this "
                "data; resume with the same data and data.sampling, or start a new run.dir"
            )
        self.rng.bit_generator.state = state["bit_generator"]


def eval_batches(
    tokens: PackedTokens, seq_len: int, micro_batch_size: int, n_batches: int, document_masking: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Fixed batches of consecutive windows from the start of a split, for a comparable eval loss.

    Up to n_batches full batches; a split too small for one full batch gives one smaller batch.
    """
    n_windows = _require_windows(tokens, seq_len)
    n_full = min(n_batches, n_windows // micro_batch_size)
    sizes = [micro_batch_size] * n_full if n_full or n_batches < 1 else [n_windows]
    batches = []
    for b, size in enumerate(sizes):
        starts = np.arange(b * micro_batch_size, b * micro_batch_size + size)
        batches.append(make_batch(tokens.windows(starts, seq_len), tokens.separator_id, document_masking))
    return batches
