"""Test helper: read back what a W&B offline run wrote (`run-<id>.wandb`), without the W&B service.

Offline runs store protobuf `Record`s in W&B's transaction log, a LevelDB-style log: a 7-byte
file header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte
header (crc32c, length, type FULL/FIRST/MIDDLE/LAST). That format and `wandb.proto` are W&B
internals, not a public API, so this reader lives with the tests (llmhpc itself only writes runs
through `wandb.init`/`log`) and the `[dev]` extra pins the wandb releases whose log it reads (measured with 0.31).
"""

from __future__ import annotations

import importlib.metadata
import json
import struct
from pathlib import Path

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
CHECKED_RELEASES = ((0, 18), (0, 32))
"""wandb releases [from, to) whose offline log this reader parses; keep in step with pyproject's [dev] pin."""


def require_known_wandb() -> None:
    """Fail with the fix when the installed wandb is outside CHECKED_RELEASES (its private format may differ)."""
    version = importlib.metadata.version("wandb")
    installed = tuple(int(p) for p in version.split(".")[:2])
    low, high = CHECKED_RELEASES
    if not low <= installed < high:
        raise RuntimeError(
            f"tests/wandb_offline.py reads the offline log of wandb {low[0]}.{low[1]} up to (not incl.) "
            f"{high[0]}.{high[1]}; wandb {version} is installed: pip install -e '.[dev]'"
        )


def iter_record_bytes(path: Path):
    """Yield each record's serialized bytes from a .wandb transaction log."""
    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log (bad header)")
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:  # block tail too short for a header: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero fill at the end of a block that was flushed early
            pos += left_in_block
            continue
        payload = data[pos + CHUNK.size : pos + CHUNK.size + length]
        pos += CHUNK.size + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def read_offline_run(run_dir: Path) -> dict:
    """Config, per-step history and run id of the newest offline run under `run_dir`/wandb.

    Returns {"run_id": str, "config": dict, "history": [dict, ...]}.
    """
    require_known_wandb()
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {Path(run_dir) / 'wandb'}")
    config: dict = {}
    history: list[dict] = []
    run_id = ""
    for file in files:  # a resumed run writes a new file for the same id
        for raw in iter_record_bytes(file):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                for item in record.run.config.update:
                    config[item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    config[item.key] = json.loads(item.value_json)
            elif kind == "history":
                items = record.history.item
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    # W&B wraps each top-level config key as {"value": ..., "desc": ...}
    config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()}
    return {"run_id": run_id, "config": config, "history": history}
