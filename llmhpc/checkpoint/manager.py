"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, keep-last-k, resumable.

Layout of `run.dir/checkpoints/`:

    step_0000100/          a complete checkpoint (the rename into this name is the commit)
        .metadata          DCP index
        __0_0.distcp       tensors: model and optimizer state, keyed by parameter FQN
        meta.json          step, data position, RNG states, W&B run id, lineage, file sizes
        config.yaml        the resolved config that made it
    .tmp-step_0000200-*/   a save in progress (or killed mid-save): never read, removed at start

A checkpoint is written into a temporary directory and renamed only when complete, so the
newest complete checkpoint is never overwritten or deleted before a newer one exists.

With several processes a save is collective: every rank writes its shards into the same
temporary directory (rank 0 picks its name and broadcasts it), and only rank 0 writes meta.json,
renames and prunes, between barriers. Tensors are keyed by parameter FQN with DCP's sharding
metadata, so a checkpoint loads under any other layout, or into one process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llmhpc.parallel.process_group import barrier, is_main_process

FORMAT_VERSION = 1
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every single-process save/load; that is a supported mode here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and the reason."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are never listed)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """Newest complete checkpoint directory, or None."""
    found = complete_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def read_meta(step_dir: Path) -> dict:
    """meta.json of a checkpoint, after checking every file it lists is present and whole."""
    step_dir = Path(step_dir)
    meta_path = step_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: meta.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {step_dir} is corrupt: meta.json does not parse ({exc})") from None
    for name, size in meta.get("files", {}).items():
        path = step_dir / name
        if not path.exists():
            raise CheckpointError(f"checkpoint {step_dir} is incomplete: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {step_dir} is corrupt: {name} has {path.stat().st_size} bytes, expected {size}"
            )
    return meta


def read_checkpoint_config(step_dir: Path):
    """The typed config that made a checkpoint."""
    from llmhpc.config.load import from_yaml

    path = Path(step_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"checkpoint {step_dir} has no config.yaml")
    return from_yaml(path.read_text(encoding="utf-8"))


def load_model_state(step_dir: Path, model: nn.Module) -> None:
    """Load only the model weights of a checkpoint into `model` (any optimizer state is ignored)."""
    read_meta(step_dir)
    state = {"model": model.state_dict()}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(step_dir))
    except Exception as exc:  # DCP raises several types for unreadable files
        raise CheckpointError(f"checkpoint {step_dir} cannot be read: {str(exc).splitlines()[0]}") from None
    model.load_state_dict(state["model"])


def _encode_rng() -> dict:
    states = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        states["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return states


def _restore_rng(states: dict) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(states["torch"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in states["cuda"]])


def _shared_tmp_name(final_name: str) -> str:
    """Temporary directory name for a save; with several ranks rank 0 draws it and all use it."""
    names = [f"{TMP_PREFIX}{final_name}-{uuid.uuid4().hex[:8]}"]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    return names[0]


def _fsync_files(root: Path, prefix: str = "") -> None:
    """fsync the files under root whose name starts with prefix (each rank syncs what it wrote)."""
    for path in sorted(root.rglob(prefix + "*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    _fsync_files(root)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


GetStates = Callable[[nn.Module, torch.optim.Optimizer], tuple[dict, dict]]
SetStates = Callable[[nn.Module, torch.optim.Optimizer, dict, dict], None]


def _set_torch_states(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


class CheckpointManager:
    """Saves and restores the full training state under `run_dir/checkpoints`.

    `get_states` / `set_states` turn the model and optimizer into FQN-keyed state dicts and back: torch's
    `get_state_dict` / `set_state_dict` by default (plain, FSDP2, TP and pipeline models); an engine
    that keeps its own partitions (DeepSpeed) passes converters to the same format, so its checkpoints
    and ours are interchangeable.
    """

    def __init__(
        self,
        run_dir: Path,
        keep_last: int = 3,
        warn=None,
        *,
        get_states: GetStates = get_state_dict,
        set_states: SetStates = _set_torch_states,
    ):
        self.get_states = get_states
        self.set_states = set_states
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=2))
        self.dir.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            for stale in self.dir.glob(TMP_PREFIX + "*"):  # a save that was killed before its rename
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict, config_yaml: str
    ) -> Path:
        """Write a complete checkpoint for `step`, then prune old ones. Returns its directory.

        Collective when several processes run: every rank must call it with the same step.
        """
        final = self.dir / step_dir_name(step)
        tmp = self.dir / _shared_tmp_name(final.name)
        model_sd, optim_sd = self.get_states(model, optimizer)
        with _single_process_ok():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        if dist.is_initialized():
            _fsync_files(tmp, f"__{dist.get_rank()}_")  # this rank's shards; rank 0 syncs the rest below
        barrier()
        if is_main_process():
            self._commit(tmp, final, step, extra, config_yaml)
        barrier()
        return final

    def _commit(self, tmp: Path, final: Path, step: int, extra: dict, config_yaml: str) -> None:
        """Rank 0: add config and meta (file sizes of every rank's shards), then rename into place and prune."""
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "saved_at": time.time(),
            "rng": _encode_rng(),
            **extra,
        }
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # same step saved again (e.g. a forced save): swap only once complete
            trash = self.dir / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
        self._prune()

    def _prune(self) -> None:
        complete = complete_checkpoints(self.dir)
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Restore model, optimizer and RNG states from one checkpoint; returns its meta."""
        meta = read_meta(step_dir)
        model_sd, optim_sd = self.get_states(model, optimizer) if optimizer is not None else (model.state_dict(), None)
        state = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd}
        try:
            with _single_process_ok():
                dcp.load(state, checkpoint_id=str(step_dir))
        except Exception as exc:  # DCP raises several types for unreadable files
            raise CheckpointError(f"checkpoint {step_dir} cannot be read: {str(exc).splitlines()[0]}") from None
        if optimizer is not None:
            self.set_states(model, optimizer, state["model"], state["optim"])
        else:
            model.load_state_dict(state["model"])
        _restore_rng(meta["rng"])
        return meta

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Load the newest usable checkpoint; a broken one is skipped with a warning naming it."""
        for step_dir in reversed(complete_checkpoints(self.dir)):
            try:
                return self.load(step_dir, model, optimizer)
            except CheckpointError as exc:
                self.warn(f"{exc}; falling back to the previous checkpoint")
        return None
