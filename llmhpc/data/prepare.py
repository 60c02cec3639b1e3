"""Tokenize a corpus once into flat, memory-mappable train/val token files.

Pretraining reads tokens with ``np.memmap`` (see ``pretrain.py``), so the corpus is tokenized
ahead of time: every document followed by the document separator, whole documents assigned to
train or val by a seeded draw. The result is written to a temporary directory and renamed into
place only when complete, and it is keyed by a fingerprint of the source files and settings, so
an interrupted prep is never mistaken for a finished one and a finished one is never redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmhpc.assets import cache_root
from llmhpc.config.schema import DataConfig
from llmhpc.data.corpus import iter_documents, source_files
from llmhpc.errors import InputError

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
_OWN_FILES = {META_FILE, "train.bin", "val.bin"}
_BATCH_DOCS = 256
_BATCH_CHARS = 4_000_000


def _stat_entry(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _tokenizer_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if not path.exists():
        return []
    path = path.resolve()
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def corpus_fingerprint(data_cfg: DataConfig, seed: int) -> str:
    """Hex digest of everything that determines the prepared tokens.

    Source files enter by path, size and modification time; settings by value. data_cfg.name,
    data_cfg.path and document_masking do not change the tokens and are left out.
    """
    settings = {
        "format_version": FORMAT_VERSION,
        "source": data_cfg.source,
        "text_field": data_cfg.text_field,
        "tokenizer": data_cfg.tokenizer,
        "val_fraction": float(data_cfg.val_fraction),
        "seed": int(seed),
        "source_files": [_stat_entry(p) for p in source_files(data_cfg.source)],
        "tokenizer_files": [_stat_entry(p) for p in _tokenizer_files(data_cfg.tokenizer)],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def read_meta(prep_dir: Path) -> dict[str, Any] | None:
    """meta.json of a complete prep in prep_dir, or None if it is missing, unreadable or incomplete."""
    try:
        meta = json.loads((Path(prep_dir) / META_FILE).read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            if (Path(prep_dir) / f"{split}.bin").stat().st_size != meta[f"{split}_tokens"] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _vocab_size(tokenizer: Any) -> int:
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


@contextmanager
def _literal_special_tokens(tokenizer: Any, spec: str) -> Iterator[Any]:
    """The fast backend, set to read special-token strings inside documents as plain text.

    Otherwise a document that quotes '<|endoftext|>' would be split into two documents.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise InputError(
            f"{spec}: corpus prep needs a fast tokenizer, this is a {type(tokenizer).__name__}; "
            "set data.tokenizer to a directory with a tokenizer.json, a .gguf file or 'smollm2'"
        )
    previous = getattr(backend, "encode_special_tokens", None)
    if previous is not None:
        backend.encode_special_tokens = True
    try:
        yield backend
    finally:
        if previous is not None:
            backend.encode_special_tokens = previous


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in documents:
        if not text:
            continue
        batch.append(text)
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_to_file(
    data_cfg: DataConfig, tokenizer: Any, separator_id: int, dtype: np.dtype, out_file: Path
) -> np.ndarray:
    """Write every document's tokens + separator to out_file; returns document offsets (n_docs + 1)."""
    offsets = [0]
    # delay: a prep that takes under a second (or fails at once on bad input) prints no bar at all
    bar = tqdm(desc=f"tokenize {data_cfg.name}", unit="doc", file=sys.stderr, dynamic_ncols=True, delay=1.0)
    with _literal_special_tokens(tokenizer, data_cfg.tokenizer) as backend, out_file.open("wb") as f, bar:
        try:
            for batch in _batches(iter_documents(data_cfg.source, data_cfg.text_field)):
                for encoding in backend.encode_batch(batch, add_special_tokens=False):
                    ids = np.asarray(encoding.ids + [separator_id], dtype=np.int64)
                    f.write(ids.astype(dtype).tobytes())
                    offsets.append(offsets[-1] + len(ids))
                bar.update(len(batch))
                bar.set_postfix(tokens=offsets[-1], refresh=False)
        except BaseException:
            bar.leave = False  # the error message comes next, alone: clear the bar instead of keeping it
            raise
    return np.asarray(offsets, dtype=np.int64)


def val_document_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the documents held out for validation: a seeded draw of whole documents.

    round(val_fraction * n_docs) of them, at least one when val_fraction > 0 and n_docs >= 2, and
    never all of them.
    """
    mask = np.zeros(n_docs, dtype=bool)
    if val_fraction <= 0 or n_docs < 2:
        return mask
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    mask[np.random.default_rng([seed, n_docs]).permutation(n_docs)[:n_val]] = True
    return mask


def _write_splits(
    all_file: Path, offsets: np.ndarray, is_val: np.ndarray, dtype: np.dtype, out: Path
) -> None:
    """Copy runs of consecutive same-split documents from all_file into train.bin / val.bin."""
    tokens = np.memmap(all_file, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
    files = {split: (out / f"{split}.bin").open("wb") for split in SPLITS}
    try:
        start = 0
        for doc in range(1, len(is_val) + 1):
            if doc == len(is_val) or is_val[doc] != is_val[start]:
                split = "val" if is_val[start] else "train"
                files[split].write(np.asarray(tokens[offsets[start] : offsets[doc]]).tobytes())
                start = doc
    finally:
        for f in files.values():
            f.close()
        del tokens


def _replace_dir(tmp: Path, out_dir: Path, fingerprint: str) -> None:
    """Rename tmp to out_dir; an old, stale prep there is moved aside and deleted afterwards."""
    old: Path | None = None
    if out_dir.exists():
        if (meta := read_meta(out_dir)) is not None and meta.get("fingerprint") == fingerprint:
            shutil.rmtree(tmp)  # another process finished the same prep first
            return
        foreign = {p.name for p in out_dir.iterdir()} - _OWN_FILES
        if foreign:
            shutil.rmtree(tmp)
            raise InputError(
                f"{out_dir}: holds files that are not a prepared corpus ({sorted(foreign)[:5]}); "
                "choose another data.path or empty it"
            )
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        meta = read_meta(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if meta is None or meta.get("fingerprint") != fingerprint:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_corpus(
    data_cfg: DataConfig, seed: int = 0, out_dir: Path | None = None, *, tokenizer: Any | None = None
) -> Path:
    """Tokenize data_cfg's corpus into out_dir (train.bin, val.bin, meta.json) and return out_dir.

    out_dir defaults to data_cfg.path, else $LLMHPC_CACHE/data/<name>-<fingerprint[:12]>. A complete
    prep with the same fingerprint already there is reused as it is. ``tokenizer`` lets a caller
    that already loaded data_cfg.tokenizer pass it in; it must be that tokenizer.
    """
    fingerprint = corpus_fingerprint(data_cfg, seed)
    if out_dir is None:
        default = cache_root() / "data" / f"{data_cfg.name}-{fingerprint[:12]}"
        out_dir = Path(data_cfg.path) if data_cfg.path else default
    out_dir = Path(out_dir).expanduser().absolute()
    if (meta := read_meta(out_dir)) is not None and meta.get("fingerprint") == fingerprint:
        return out_dir

    from llmhpc.data.tokenizer import document_separator_id, load_tokenizer

    if tokenizer is None:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    separator_id = int(document_separator_id(tokenizer))
    vocab_size = _vocab_size(tokenizer)
    dtype = token_dtype(vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        all_file = tmp / "all.tmp"
        offsets = _tokenize_to_file(data_cfg, tokenizer, separator_id, dtype, all_file)
        n_docs = len(offsets) - 1
        if n_docs == 0:
            raise InputError(
                f"{data_cfg.source}: the corpus holds no non-empty documents; "
                "point data.source at files that contain text"
            )
        is_val = val_document_mask(n_docs, data_cfg.val_fraction, seed)
        _write_splits(all_file, offsets, is_val, dtype, tmp)
        all_file.unlink()
        lengths = np.diff(offsets)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "separator_id": separator_id,
            "tokenizer": data_cfg.tokenizer,
            "source": data_cfg.source,
            "text_field": data_cfg.text_field,
            "val_fraction": float(data_cfg.val_fraction),
            "seed": int(seed),
            "source_file_count": len(source_files(data_cfg.source)),
            "train_tokens": int(lengths[~is_val].sum()),
            "val_tokens": int(lengths[is_val].sum()),
            "train_documents": int((~is_val).sum()),
            "val_documents": int(is_val.sum()),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out_dir, fingerprint)
    return out_dir


def prepare_on_rank0(data_cfg: DataConfig, seed: int) -> Path:
    """`prepare_corpus` under torchrun: rank 0 tokenizes once, then every rank finds its shards.

    A bad input on rank 0 is raised on every rank (same type, same one line), so no rank is left waiting
    at a barrier its peer will never reach, or dies on the broken connection with a traceback.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return prepare_corpus(data_cfg, seed=seed)
    failure: list[str] | None = None
    if dist.get_rank() == 0:
        try:
            prepare_corpus(data_cfg, seed=seed)
        except (InputError, FileNotFoundError) as exc:
            failure = [type(exc).__name__, str(exc)]
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        kind, message = box[0]
        raise (FileNotFoundError if kind == "FileNotFoundError" else InputError)(message)
    return prepare_corpus(data_cfg, seed=seed)  # finds the shards rank 0 just wrote
