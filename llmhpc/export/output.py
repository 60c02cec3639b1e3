"""What every converter does around its format: write atomically, show progress, summarize, record lineage.

An export is written into a temporary path next to `dst` and renamed into place only when complete, so a
failed or interrupted conversion leaves nothing behind, and an existing `dst` (replaced only with
`overwrite=true`) is untouched until the new output is whole. `lineage.json` beside the output says where
the weights came from (source, checkpoint step, config hash, llmhpc version) and how they were converted.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from llmhpc.errors import InputError


@dataclass
class ExportSummary:
    """What a conversion wrote."""

    dst: Path
    format: str
    dtype: str
    quant: str
    tensors: int = 0
    """Tensors written (quantized ones count once, their scales not)."""
    files: dict[str, int] = field(default_factory=dict)
    """{file name relative to dst: bytes} of everything written."""
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    def line(self) -> str:
        return (f"wrote {self.dst} ({self.format}): {self.tensors} tensors, {self.bytes / 2**20:,.1f} MiB in "
                f"{len(self.files)} files, dtype {self.dtype}, quant {self.quant}, {self.seconds:.1f} s")


def lineage_path(dst: Path) -> Path:
    """Where the lineage record of an output goes: inside an output directory, beside an output file."""
    dst = Path(dst)
    return dst / "lineage.json" if dst.suffix == "" else dst.with_name(dst.name + ".lineage.json")


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse an existing destination (unless overwrite) before any work starts."""
    if not str(dst):
        raise InputError("dst is not set: name the output directory (hf, trtllm) or .gguf file, e.g. dst=exports/x")
    if Path(dst).exists() and not overwrite:
        raise InputError(f"{dst}: already exists; choose another dst, or pass overwrite=true to replace it")


@contextmanager
def atomic_output(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary path (a directory, or a file path when dst has a suffix) renamed to `dst` on success.

    On any error the temporary output is removed and `dst` is left as it was.
    """
    dst = Path(dst)
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}")
    if dst.suffix == "":
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = None
    if dst.exists():  # overwrite: move the old one aside, and delete it only once the new one is in place
        old = dst.with_name(f".old-{dst.name}-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_lineage(dst_tmp: Path, final: Path, source_lineage: dict, summary: ExportSummary, options: dict) -> None:
    """lineage.json for an output being written at `dst_tmp` (its final path `final`)."""
    record = {"source": source_lineage, "format": summary.format, "dtype": summary.dtype, "quant": summary.quant,
              "options": options, "written_at": time.time(), "files": summary.files}
    path = lineage_path(dst_tmp) if dst_tmp.is_dir() else lineage_path(dst_tmp).with_name(
        lineage_path(final).name + ".tmp")
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    if not dst_tmp.is_dir():  # a single-file output: its record sits beside it, written after the file itself
        path.replace(lineage_path(final))


def file_sizes(root: Path) -> dict[str, int]:
    """{path relative to root: bytes} of every file under a directory (or the file itself)."""
    root = Path(root)
    if root.is_file():
        return {root.name: root.stat().st_size}
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def progress(total: int, desc: str) -> tqdm:
    """A progress bar over tensors, on stderr."""
    return tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True, leave=False)
