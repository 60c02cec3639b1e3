"""`metrics.jsonl`: one JSON object per logged step, the run's own record of its metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlLogger:
    """Appends metric records to run.dir/metrics.jsonl, flushed at every write."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop records with a step greater than `step` (written before a crash, redone on resume).

    Rewritten through a temporary file and an atomic rename, so a crash here loses nothing.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = [line for line in read_metrics(path) if line.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
