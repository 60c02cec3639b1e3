"""Fingerprints of weight sources, so a checkpoint that references a frozen base can tell it is the same one.

A run whose base stays frozen (LoRA, a frozen half) does not rewrite the base in every checkpoint; it
records where the base came from and this fingerprint, and resuming checks both, so a run never silently
continues on other weights that happen to live at the same path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def _file_digest(path: Path, digest) -> None:
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)


def source_fingerprint(path: str | Path) -> dict:
    """{'sha256': ..., 'bytes': ...} over the content of a file, or of every file under a directory.

    Directory entries are hashed in sorted order with their relative names, so renaming or moving a file
    changes the fingerprint but the directory's location does not. Reads every byte (about 1 GB/s).
    """
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    total = 0
    for file in files:
        if file is not root:
            digest.update(str(file.relative_to(root)).encode() + b"\0")
        _file_digest(file, digest)
        total += file.stat().st_size
    return {"sha256": digest.hexdigest(), "bytes": total}
