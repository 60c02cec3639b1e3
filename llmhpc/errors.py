"""Errors a user can fix, each one line: the lowest layer of the package (it imports nothing of llmhpc).

The CLI prints these as `error: <message>` with a non-zero exit code and no traceback, so every message
names what is wrong, where (a path, and a line or byte offset when there is one) and how to fix it.
"""

from __future__ import annotations


class InputError(ValueError):
    """A file or directory the user named (data, model weights, tokenizer, checkpoint) that cannot be used.

    The message starts with the path (and `line N` / `byte N` where that helps) and says what to do.
    """


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and the reason."""


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite steps); the message says why."""
