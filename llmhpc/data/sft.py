"""Supervised fine-tuning data: chat rows → tokens with an assistant-only loss → packed, resumable batches.

Pipeline (a stage calls these in order)::

    examples, report = load_sft_examples(source, tokenizer, seq_len, chat_template=..., on_error="skip")
    log(report.summary()); log each of report.problems
    train, val = split_examples(examples, val_fraction, seed)
    loader = SFTLoader(train, seq_len, micro_batch_size, seed, pack=True, dp_rank=..., dp_size=...)
    eval_batches = sft_eval_batches(val, seq_len, micro_batch_size, n_batches)

Rows are JSONL lines or Parquet rows in either layout TRL and OpenAI use: ``messages`` (a list of
``{"role": system|user|assistant|tool, "content": str}``, multi-turn included) or ``prompt`` / ``completion``
(strings: one user and one assistant turn; or lists of messages, TRL's conversational prompt-completion). A row
with both (the package's arithmetic files) is read through ``messages``. Only a message's role and content reach
the template (keys such as ``name`` or ``tool_calls`` are not passed on). Rendering and the assistant mask are
`llmhpc.data.chat`'s job.

Malformed rows are never dropped silently: each one is reported with its file and line (Parquet: row) and a
reason, and ``on_error`` decides: 'fail' raises an `InputError` at the first one, 'skip' leaves it out and
counts it in the returned `DataReport` (which the stage logs). An example longer than seq_len + 1 tokens is
malformed too ('too_long'): cutting it would train on a conversation that stops mid-answer, with no
end-of-turn token, so it is reported rather than truncated; raise trainer.seq_len or shorten the data.

Batches have the shape `llmhpc.train.objective.NextTokenObjective` consumes unchanged: ``input_ids`` and
``labels`` [B, seq_len] with labels already shifted (labels[t] is the token after input_ids[t], or -100 when
that token is not the assistant's). Packed batches add ``position_ids`` (restarting at 0 for each
conversation) and ``document_ids`` (a query attends only inside its own conversation), which the objective
passes to the model's forward; with both, each conversation in a packed row gets exactly the logits and loss
it gets alone. The padding at a row's end is a document of its own with labels -100.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from llmhpc.data.chat import ROLES, ChatRenderer, Message, RenderError
from llmhpc.errors import InputError

IGNORE_INDEX = -100
"""Label of a position without a loss; equal to `llmhpc.train.losses.IGNORE_INDEX` (data may not import train)."""

SUFFIXES = (".jsonl", ".parquet")
ON_ERROR = ("skip", "fail")
MAX_PROBLEMS = 50
"""Problem messages a `DataReport` keeps verbatim; the counts by reason cover every row."""

REASONS = {
    "bad_json": "is not valid JSON",
    "bad_utf8": "is not valid UTF-8",
    "not_object": "is not a JSON object",
    "no_messages": "has neither 'messages' nor 'prompt' and 'completion'",
    "bad_message": "has a message that is not an object with a string 'content'",
    "missing_role": "has a message without a 'role'",
    "bad_role": "has a message whose role is not one of " + ", ".join(ROLES),
    "no_assistant": "has no assistant turn",
    "empty_assistant": "has an empty assistant turn",
    "too_long": "is longer than the sequence length",
    "render": "cannot be rendered with the chat template",
    "no_pair": "has no 'chosen' and 'rejected'",
    "same_pair": "has the same chosen and rejected answer",
}
"""Why a row is malformed: the keys of `DataReport.skipped`."""


@dataclass
class DataReport:
    """What reading a source did to its rows, for the log: rows seen, examples kept, skipped rows by reason."""

    rows: int = 0
    kept: int = 0
    label: str = "sft data"
    """What was read, for the summary line ('sft data', 'preference data')."""
    unit: str = "examples"
    """What a kept row became ('examples', 'pairs')."""
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    """The first MAX_PROBLEMS problems, each 'path, line N: what is wrong'."""

    def add(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def summary(self) -> str:
        """One log line, e.g. 'sft data: 1200 rows, 1195 examples, 5 skipped (too_long 3, bad_json 2)'."""
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.skipped.most_common())
        return (f"{self.label}: {self.rows} rows, {self.kept} {self.unit}, {total} skipped"
                + (f" ({reasons})" if total else ""))


class RowError(ValueError):
    """A malformed row: `reason` is a key of REASONS, the message says what exactly."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or REASONS[reason])
        self.reason = reason


@dataclass(frozen=True)
class Conversation:
    """A validated row: where it comes from ('path, line N') and its messages."""

    where: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class SFTExample:
    """One tokenized conversation. `tokens` and `assistant` (the mask) have the same length; the tokens end at
    the last assistant token, since what follows it carries no loss and cannot change the loss before it."""

    where: str
    tokens: np.ndarray
    assistant: np.ndarray
    digest: str
    """Hex digest of the messages: the seeded train / val split is decided from it."""

    @property
    def length(self) -> int:
        """Positions the example fills in a row: its tokens but the last (which is only ever a label)."""
        return len(self.tokens) - 1

    @property
    def n_labels(self) -> int:
        """Tokens that carry a loss (assistant tokens after the first position)."""
        return int(self.assistant[1:].sum())


# ---- reading rows -----------------------------------------------------------------------------------


def sft_files(source: str | Path, what: str = "SFT data") -> list[Path]:
    """The .jsonl / .parquet files of a file or directory (recursively, sorted, hidden files skipped)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"{path}: {what} not found; set data.source to a .jsonl / .parquet file or a directory")
    path = path.resolve()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise InputError(f"{path}: no .jsonl or .parquet files under this directory; point data.source at some")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"{path}: {what} must be in a .jsonl or .parquet file (or a directory of them)")
    return [path]


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row or RowError) per non-blank line."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}, line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, RowError("bad_utf8", f"byte {e.start} of the line is not valid UTF-8 ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RowError("bad_json", f"invalid JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: Path, columns: Sequence[str] = ("messages", "prompt", "completion")
                  ) -> Iterator[tuple[str, Any]]:
    """(where, row) per Parquet row, with those of `columns` the file has; 'row N' counts from 1 over the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise InputError(f"{path}: not a readable Parquet file ({e}); re-export it or convert it to .jsonl") from None
    names = parquet.schema_arrow.names
    wanted = [c for c in columns if c in names]
    if not wanted:
        raise InputError(f"{path}: none of the columns {list(columns)} (it has {names}); rename them")
    row_no = 0
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=wanted)
        except pa.ArrowException as e:
            raise InputError(f"{path}, row group {group}: cannot be read ({e}); re-export the file") from None
        for row in table.to_pylist():
            row_no += 1
            yield f"{path}, row {row_no}", {k: v for k, v in row.items() if v is not None}


def _check_messages(value: Any, name: str) -> list[Message]:
    """Each message an object with a known role and string content; assistant turns not empty."""
    if not isinstance(value, list) or not value:
        raise RowError("no_messages", f"'{name}' is not a non-empty list of messages")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RowError("bad_message", f"'{name}' message {i} is not an object with a string 'content'")
        role = m.get("role")
        if role is None or role == "":
            raise RowError("missing_role", f"'{name}' message {i} has no 'role'")
        if role not in ROLES:
            raise RowError("bad_role", f"'{name}' message {i} has role {role!r}, not one of {', '.join(ROLES)}")
        if role == "assistant" and not m["content"].strip():
            raise RowError("empty_assistant", f"'{name}' message {i} is an empty assistant turn")
        out.append({"role": role, "content": m["content"]})
    return out


def _side(value: Any, role: str, name: str) -> list[Message]:
    """A prompt / completion: a string is one turn of `role`, a list is messages (TRL's conversational form)."""
    if isinstance(value, str):
        if role == "assistant" and not value.strip():
            raise RowError("empty_assistant", f"'{name}' is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _check_messages(value, name)
    raise RowError("no_messages", f"'{name}' is {type(value).__name__}, not a string or a list of messages")


def row_messages(row: Any) -> list[Message]:
    """The messages of one row (see the module docstring); RowError if it is malformed."""
    if not isinstance(row, dict):
        raise RowError("not_object", f"the row is {type(row).__name__}, not a JSON object")
    if "messages" in row:
        messages = _check_messages(row["messages"], "messages")
    elif "prompt" in row and "completion" in row:
        messages = _side(row["prompt"], "user", "prompt") + _side(row["completion"], "assistant", "completion")
    else:
        raise RowError("no_messages", f"the row has neither 'messages' nor 'prompt' and 'completion' ({list(row)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no_assistant", "no message has role 'assistant', so there is nothing to learn")
    return messages


def _fix(reason: str) -> str:
    if reason == "too_long":
        return "raise trainer.seq_len, shorten or remove the row, or set data.on_error=skip"
    return "fix or remove the row, or set data.on_error=skip to leave such rows out"


def _problem(report: DataReport, on_error: str, where: str, error: RowError) -> None:
    message = f"{where}: {error}"
    if on_error == "fail":
        raise InputError(f"{message}; {_fix(error.reason)}")
    report.add(error.reason, message)


def read_conversations(
    source: str | Path, on_error: str = "skip", report: DataReport | None = None
) -> list[Conversation]:
    """Validated conversations of every row of `source`, in file and line order; malformed rows per `on_error`."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    report = report if report is not None else DataReport()
    conversations = []
    for path in sft_files(source):
        rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _parquet_rows(path)
        for where, row in rows:
            report.rows += 1
            try:
                if isinstance(row, RowError):
                    raise row
                conversations.append(Conversation(where, tuple(row_messages(row))))
            except RowError as e:
                _problem(report, on_error, where, e)
    return conversations


def _digest(messages: Sequence[Message]) -> str:
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def tokenize_conversation(conversation: Conversation, renderer: ChatRenderer, seq_len: int) -> SFTExample:
    """Render and check one conversation; RowError('render' | 'too_long' | 'empty_assistant')."""
    try:
        rendered = renderer.render(conversation.messages)
    except RenderError as e:
        raise RowError("render", str(e)) from None
    mask = np.asarray(rendered.assistant_mask, dtype=bool)
    # Tokens after the last assistant token carry no loss and cannot change the loss before them (causal
    # attention): ChatML's final newline, or turns after the last assistant one. They would only take room.
    end = int(np.flatnonzero(mask)[-1]) + 1 if mask.any() else len(mask)
    tokens = np.asarray(rendered.input_ids[:end], dtype=np.int64)
    example = SFTExample(conversation.where, tokens, mask[:end], _digest(conversation.messages))
    if example.length > seq_len:
        raise RowError("too_long", f"{len(tokens)} tokens, more than seq_len + 1 = {seq_len + 1}")
    if example.n_labels == 0:
        raise RowError("empty_assistant", "the assistant turns render to no tokens")
    return example


def load_sft_examples(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    chat_template: str | None = None,
    last_turn_only: bool = False,
    on_error: str = "skip",
) -> tuple[list[SFTExample], DataReport]:
    """Read, validate, render and tokenize every row of `source` (a file or directory).

    Returns the examples in file / line order and a report to log. Raises InputError when the tokenizer has no
    chat template and none is given, at the first malformed row with on_error='fail', or when no row is usable.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    renderer = ChatRenderer(tokenizer, chat_template, last_turn_only)  # fails first when there is no template
    report = DataReport()
    examples = []
    for conversation in read_conversations(source, on_error, report):
        try:
            examples.append(tokenize_conversation(conversation, renderer, seq_len))
        except RowError as e:
            _problem(report, on_error, conversation.where, e)
    report.kept = len(examples)
    if not examples:
        raise InputError(
            f"{source}: no usable SFT example ({report.summary()}; first problem: "
            f"{report.problems[0] if report.problems else 'the source has no rows'}); fix the data"
        )
    return examples, report


def split_examples(
    examples: Sequence[SFTExample], val_fraction: float, seed: int
) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val): each example is held out when a hash of (seed, its messages) falls below val_fraction.

    Deciding per example (not by position) keeps an example on the same side when rows are added, removed or
    reordered, and puts identical conversations on the same side, so no duplicate leaks from train into val.
    With val_fraction > 0 and at least two examples, val gets at least one (the lowest hash).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(examples) < 2:
        return list(examples), []
    scores = [
        int.from_bytes(hashlib.blake2b(f"{seed}:{e.digest}".encode(), digest_size=8).digest(), "big") / 2**64
        for e in examples
    ]
    held = [s < val_fraction for s in scores]
    if not any(held):
        held[int(np.argmin(scores))] = True
    if all(held):
        held[int(np.argmax(scores))] = False
    train = [e for e, h in zip(examples, held, strict=True) if not h]
    val = [e for e, h in zip(examples, held, strict=True) if h]
    return train, val


# ---- packing and batches ----------------------------------------------------------------------------


def first_fit(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: visit examples in `order`, put each in the first row with room, else open a row.

    Returns rows of example indices. The leftmost row with enough room is found in O(log rows) with a
    max-tree over the rows' free space, so packing a large dataset each epoch costs little.
    """
    size = 1
    while size < max(1, len(order)):
        size *= 2
    free = [0] * (2 * size)  # free[size + r]: room left in row r (0 for rows not opened yet)
    rows: list[list[int]] = []

    def set_free(r: int, value: int) -> None:
        i = size + r
        free[i] = value
        i //= 2
        while i:
            free[i] = max(free[2 * i], free[2 * i + 1])
            i //= 2

    for index in order:
        need = int(lengths[index])
        if need > capacity:
            raise ValueError(f"example {index} has length {need} > capacity {capacity}")
        if free[1] < need:
            rows.append([])
            set_free(len(rows) - 1, capacity)
        i = 1
        while i < size:
            i = 2 * i if free[2 * i] >= need else 2 * i + 1
        r = i - size
        rows[r].append(int(index))
        set_free(r, free[i] - need)
    return rows


def make_sft_batch(
    rows: Sequence[Sequence[SFTExample]], seq_len: int, pack: bool = True, pad_id: int = 0, width_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Batch dict of rows of examples: input_ids, labels [B, width]; position_ids, document_ids when packed.

    Each example fills `length` positions: its tokens but the last as inputs, the next tokens as labels where
    those are assistant tokens (else IGNORE_INDEX). Packed rows are seq_len wide. Without packing each row holds
    one example, right-padded to the longest example of the batch (not to seq_len: padding is computed like
    tokens, and TRL's collator pads the same way), rounded up to a multiple of `width_multiple` (tensor
    parallel's sequence split needs one of tp): causal attention already keeps a row's tokens from seeing the
    padding after them, so no extra keys are needed.
    """
    batch = len(rows)
    if not pack:
        longest = max((example.length for row in rows for example in row), default=1)
        seq_len = min(seq_len, -(-longest // width_multiple) * width_multiple)
    input_ids = np.full((batch, seq_len), pad_id, dtype=np.int64)
    labels = np.full((batch, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((batch, seq_len), dtype=np.int64)
    document_ids = np.zeros((batch, seq_len), dtype=np.int64)
    for b, row in enumerate(rows):
        if not pack and len(row) > 1:
            raise ValueError("an unpacked row holds one example")
        start = 0
        for doc, example in enumerate(row):
            n = example.length
            if start + n > seq_len:
                raise ValueError(f"row {b} needs more than seq_len={seq_len} positions")
            input_ids[b, start : start + n] = example.tokens[:-1]
            labels[b, start : start + n] = np.where(example.assistant[1:], example.tokens[1:], IGNORE_INDEX)
            position_ids[b, start : start + n] = np.arange(n)
            document_ids[b, start : start + n] = doc
            start += n
        position_ids[b, start:] = np.arange(seq_len - start)  # the padding: a document of its own
        document_ids[b, start:] = len(row)
    out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    if pack:
        out["position_ids"] = torch.from_numpy(position_ids)
        out["document_ids"] = torch.from_numpy(document_ids)
    return out


def _check_examples(examples: Sequence[SFTExample], seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not examples:
        raise InputError(f"the SFT {what} split has no examples; add data or change data.val_fraction")
    too_long = [e.where for e in examples if e.length > seq_len]
    if too_long:
        raise ValueError(f"{too_long[0]}: example longer than seq_len + 1 = {seq_len + 1} ({len(too_long)} such)")


class SFTLoader:
    """Endless, seeded, resumable stream of (packed) SFT micro-batches, sliced by data-parallel rank.

    Each epoch shuffles the examples with a generator seeded by (seed, epoch) and, with `pack`, packs them
    first-fit in that order into rows of seq_len positions; without it each example is a row. The rows are a
    pure function of (seed, epoch), so the position is two ints (epoch, row index) and a restored loader yields
    exactly the batches the original would have. Like `PretrainLoader`, every call advances the shared stream
    by micro_batch_size x dp_size rows and each rank keeps its own consecutive slice.
    """

    def __init__(
        self,
        examples: Sequence[SFTExample],
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        pack: bool = True,
        dp_rank: int = 0,
        dp_size: int = 1,
        pad_id: int = 0,
        width_multiple: int = 1,
    ) -> None:
        _check_examples(examples, seq_len, "train")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.examples = list(examples)
        self.lengths = [e.length for e in self.examples]
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.pack = pack
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.pad_id = pad_id
        self.width_multiple = width_multiple
        self.n_examples = len(self.examples)
        self.n_tokens = int(sum(len(e.tokens) for e in self.examples))
        self.epoch = 0
        self.index = 0
        self._rows_epoch = -1
        self._rows: list[list[int]] = []

    def epoch_rows(self, epoch: int | None = None) -> list[list[int]]:
        """Rows (lists of example indices) of an epoch, in the order they are served."""
        epoch = self.epoch if epoch is None else epoch
        if self._rows_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)
            self._rows = first_fit(self.lengths, order, self.seq_len) if self.pack else [[int(i)] for i in order]
            self._rows_epoch = epoch
        return self._rows

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch; an epoch that ends inside it continues with the next epoch's rows."""
        mine: list[list[SFTExample]] = []
        first = self.dp_rank * self.micro_batch_size
        for i in range(self.micro_batch_size * self.dp_size):
            if self.index >= len(self.epoch_rows()):
                self.epoch += 1
                self.index = 0
            if first <= i < first + self.micro_batch_size:
                mine.append([self.examples[j] for j in self.epoch_rows()[self.index]])
            self.index += 1
        return make_sft_batch(mine, self.seq_len, self.pack, self.pad_id, self.width_multiple)

    def state_dict(self) -> dict[str, Any]:
        """Position of the stream as plain values, for checkpoints (with what identifies the data)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "pack": self.pack,
            "n_examples": self.n_examples,
            "n_tokens": self.n_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() of a loader over the same examples, seed, seq_len and packing."""
        for key in ("seed", "seq_len", "pack", "n_examples", "n_tokens"):
            if state.get(key) != getattr(self, key):
                raise InputError(
                    f"SFT data: the checkpoint's data position has {key}={state.get(key)} but this data gives "
                    f"{getattr(self, key)}; resume with the same data, run.seed, trainer.seq_len and data.pack, "
                    "or start a new run.dir"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.epoch_rows(epoch)):
            raise ValueError(f"SFT loader state out of range: {state}")
        self.epoch, self.index = epoch, index


def sft_eval_batches(
    examples: Sequence[SFTExample],
    seq_len: int,
    micro_batch_size: int,
    n_batches: int,
    pack: bool = True,
    pad_id: int = 0,
    width_multiple: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """Fixed held-out batches (examples in their given order, packed first-fit), for a comparable eval loss.

    Up to n_batches batches of micro_batch_size rows; the last may be smaller, so a small val split is used whole.
    """
    _check_examples(examples, seq_len, "val")
    order = range(len(examples))
    lengths = [e.length for e in examples]
    rows = first_fit(lengths, order, seq_len) if pack else [[i] for i in order]
    batches = []
    for start in range(0, min(len(rows), n_batches * micro_batch_size), micro_batch_size):
        chunk = [[examples[j] for j in row] for row in rows[start : start + micro_batch_size]]
        batches.append(make_sft_batch(chunk, seq_len, pack, pad_id, width_multiple))
    return batches
