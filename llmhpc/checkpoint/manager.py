"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, keep-last-k, resumable.

Layout of `run.dir/checkpoints/`:

    step_0000100/          a complete checkpoint (the rename into this name is the commit)
        .metadata          DCP index
        __0_0.distcp       tensors: each component's trained weights and optimizer state, keyed
                           `<component>.model.<parameter FQN>` / `<component>.optim.…`
        meta.json          step, components (their frozen parameters and base), each rank's RNG states
                           and data position, W&B run id, lineage, file sizes
        config.yaml        the resolved config that made it
    .tmp-step_0000200-*/   a save in progress (or killed mid-save): never read, removed at start

A checkpoint holds named components (`Component`: e.g. 'model' in pretraining and SFT; 'policy' and
'value' in PPO), each a model with its optimizer. Only what trains is written: frozen parameters (a
LoRA run's base, a frozen half) are rebuilt from their base, which meta.json references (a source path
and its hash, or the seeded init) and which is checked again on resume. Format 1 checkpoints (one model
and one optimizer under 'model' / 'optim', one RNG state) still load, as a single component.

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
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from llmhpc.errors import CheckpointError
from llmhpc.process_group import barrier, is_main_process

FORMAT_VERSION = 2
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def single_process_ok():
    """DCP warns on every single-process save/load; that is a supported mode here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are never listed)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


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


def stored_shapes(step_dir: Path, component: str | None = None) -> dict[str, torch.Size]:
    """{parameter name: global shape} of the model weights a checkpoint's component holds (DCP's index only;
    frozen weights it references are not among them). `component` defaults to the first one."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_meta(step_dir)
    name = component or next(iter(_saved_components(meta)))
    prefix = "model." if meta.get("format_version", 1) == 1 else f"{name}.model."
    metadata = dcp.FileSystemReader(str(step_dir)).read_metadata()
    return {
        key[len(prefix) :]: item.size
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }


def stored_tensor_reader(
    step_dir: Path, component: str | None = None
) -> Callable[[dict[str, torch.Size]], dict[str, torch.Tensor]]:
    """A function {name: shape} -> {name: fp32 tensor} reading those model weights (a subset of `stored_shapes`)
    whole on this process alone (no process group): for readers that export or merge a checkpoint rather than
    train on it. meta.json is read once here, however many reads follow (an exporter reads one weight at a time)."""
    meta = read_meta(step_dir)
    name = component or next(iter(_saved_components(meta)))
    format_1 = meta.get("format_version", 1) == 1

    def read(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        values = {key: torch.empty(shape, dtype=torch.float32) for key, shape in shapes.items()}
        state = {"model": values} if format_1 else {name: {"model": values}}
        with single_process_ok():
            dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
        return values

    return read


def primary_component(step_dir: Path) -> str:
    """Name of a checkpoint's first component (the model `load_pretrained` returns)."""
    return next(iter(_saved_components(read_meta(step_dir))))


def load_model_state(
    step_dir: Path, model: nn.Module, component: str | None = None, aliases: dict[str, str] | None = None,
    skip: Collection[str] = (),
) -> list[str]:
    """Load a component's saved weights into `model` (plain, or FSDP / TP / pipeline-pruned), no optimizer.

    `component` defaults to the checkpoint's first one. `aliases` maps a parameter to the name its values are
    saved under (a pipeline's tied head copy reads the embedding). `skip`: parameters of `model` the checkpoint
    does not have and the caller fills (adapters added on top of a saved base). Returns the frozen parameter
    names the checkpoint does not hold: those keep the values `model` already has, so load the base first.
    """
    meta = read_meta(step_dir)
    saved = _saved_components(meta)
    name = component or next(iter(saved))
    if name not in saved:
        raise CheckpointError(f"checkpoint {step_dir} has no component '{name}' (it holds: {', '.join(saved)})")
    frozen = set(saved[name].get("frozen", []))
    model_sd = {k: v for k, v in get_model_state_dict(model).items() if k not in frozen and k not in skip}
    copies = {}  # parameter -> the loaded one it equals (both held by this process)
    for param, stored in (aliases or {}).items():
        if param in model_sd:
            copies[param] = stored
            if stored not in model_sd:
                model_sd[stored] = model_sd[param]
            del model_sd[param]
    state = {"model": model_sd} if meta.get("format_version", 1) == 1 else {name: {"model": model_sd}}
    try:
        with single_process_ok():
            dcp.load(state, checkpoint_id=str(step_dir))
    except (Exception, CheckpointException) as exc:  # DCP: several types, some BaseException
        raise CheckpointError(f"checkpoint {step_dir} cannot be read: {str(exc).splitlines()[0]}") from None
    for param, stored in copies.items():
        model_sd[param] = model_sd[stored]
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=False))
    return sorted(frozen)


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


def set_torch_states(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    # strict=False: frozen parameters are not in a checkpoint (they come from the component's base)
    set_state_dict(
        model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=StateDictOptions(strict=False)
    )


@dataclass
class Component:
    """One named part of a run's training state: a model and the optimizer that trains it.

    `get_states` / `set_states` turn the model and optimizer into FQN-keyed state dicts and back: torch's
    `get_state_dict` / `set_state_dict` by default (plain, FSDP2, TP and pipeline models); an engine that
    keeps its own partitions (DeepSpeed) passes converters to the same format, so its checkpoints and ours
    are interchangeable.
    """

    name: str
    """Key of the component in the checkpoint, e.g. 'model', 'policy', 'value'."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    base: dict | None = None
    """Where the frozen parameters come from, e.g. {'source': path, 'sha256': ...} or {'source': 'init',
    'seed': 1234}; stored in meta.json and compared on resume, so a run never continues on another base."""
    get_states: GetStates = get_state_dict
    set_states: SetStates = set_torch_states

    def frozen(self) -> list[str]:
        """Names of the parameters that do not train (not written to checkpoints)."""
        return [name for name, p in self.model.named_parameters() if not p.requires_grad]

    def trained_states(self) -> tuple[dict, dict]:
        """(model state dict without the frozen parameters, optimizer state dict)."""
        model_sd, optim_sd = self.get_states(self.model, self.optimizer)
        frozen = set(self.frozen())
        return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _local_bytes(state) -> int:
    """Bytes of the tensors this rank writes for a nested state dict (a DTensor's local shard only)."""
    if isinstance(state, DTensor):
        return state.to_local().nbytes
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_local_bytes(v) for v in state)
    return 0


def _gather_rank_states(rank_state: dict) -> list[dict]:
    """Every rank's state (its RNG and what the caller passed), in rank order, on every rank."""
    states = [rank_state]
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rank_state)
    return states


def _this_rank_state(meta: dict, warn: Callable[[str], None]) -> dict:
    """This rank's saved state: its own entry when the world size matches, else rank 0's (with a warning)."""
    if "ranks" not in meta:  # format 1: one RNG state and data position for every rank
        return {"rng": meta["rng"], "data": meta.get("data")}
    ranks = meta["ranks"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(ranks) == world:
        return ranks[rank]
    if rank == 0:
        warn(
            f"checkpoint step {meta['step']} was saved by {len(ranks)} ranks and resumes on {world}: every rank "
            "continues from rank 0's data position and RNG state"
        )
    return ranks[0]


class CheckpointManager:
    """Saves and restores the training state of named components under `run_dir/checkpoints`."""

    def __init__(self, run_dir: Path, keep_last: int = 3, warn=None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=2))
        self.dir.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            for stale in self.dir.glob(TMP_PREFIX + "*"):  # a save that was killed before its rename
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def save(
        self, step: int, components: list[Component], extra: dict, config_yaml: str, rank_state: dict | None = None
    ) -> Path:
        """Write a complete checkpoint for `step`, then prune old ones. Returns its directory.

        `rank_state` (e.g. this rank's data position) is kept per rank, next to each rank's RNG states.
        Collective when several processes run: every rank must call it with the same step.
        """
        final = self.dir / step_dir_name(step)
        tmp = self.dir / _shared_tmp_name(final.name)
        state = {}
        for component in components:
            model_sd, optim_sd = component.trained_states()
            state[component.name] = {"model": model_sd, "optim": optim_sd}
        ranks = _gather_rank_states({**(rank_state or {}), "rng": _encode_rng()})
        try:
            with single_process_ok():
                dcp.save(state, checkpoint_id=str(tmp))
        except (CheckpointException, OSError, RuntimeError) as exc:  # each rank gets dcp's collective failure
            if is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)  # a partial write must not hold the space it took
            full = self._disk_full_message(step, state)
            if full is None:
                raise
            raise CheckpointError(full) from exc
        if dist.is_initialized():
            _fsync_files(tmp, f"__{dist.get_rank()}_")  # this rank's shards; rank 0 syncs the rest below
        barrier()
        if is_main_process():
            described = {c.name: {"frozen": c.frozen(), "base": c.base} for c in components}
            self._commit(tmp, final, {"step": step, "components": described, "ranks": ranks, **extra}, config_yaml)
        barrier()
        return final

    def _disk_full_message(self, step: int, state: dict) -> str | None:
        """Why a failed save failed, when the reason is space: the disk holding the checkpoints has less room
        than this rank's tensors need (None otherwise: the original error is raised)."""
        needed = _local_bytes(state)
        free = shutil.disk_usage(self.dir).free
        if free >= needed:
            return None
        last = latest_checkpoint(self.dir)
        kept = f"the last complete checkpoint, {last.name}, is untouched" if last else "no earlier checkpoint exists"
        return (f"{self.dir}: no space for checkpoint step {step} (needs ~{_size(needed)}, {_size(free)} free; "
                f"{kept}); free disk space, lower trainer.keep_last or point run.dir at a larger disk, then run the "
                "same command again to resume")

    def _commit(self, tmp: Path, final: Path, meta: dict, config_yaml: str) -> None:
        """Rank 0: add config and meta (file sizes of every rank's shards), then rename into place and prune."""
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        meta = {"format_version": FORMAT_VERSION, "saved_at": time.time(), **meta}
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

    def load(self, step_dir: Path, components: list[Component]) -> dict:
        """Restore every component, and this rank's RNG states, from one checkpoint.

        Returns its meta, with `meta["rank"]` this rank's saved state (its data position under "data").
        """
        meta = read_meta(step_dir)
        saved = _saved_components(meta)
        states = {}
        for component in components:
            if component.name not in saved:
                raise CheckpointError(
                    f"checkpoint {step_dir} has no component '{component.name}' (it holds: {', '.join(saved)})"
                )
            base = saved[component.name].get("base")
            if base is not None and component.base is not None and base != component.base:
                raise CheckpointError(
                    f"checkpoint {step_dir} trained '{component.name}' on base {_describe(base)}, but this run's "
                    f"base is {_describe(component.base)}; resume with the original model.init_from or start a "
                    "new run.dir"
                )
            model_sd, optim_sd = component.trained_states()
            states[component.name] = {"model": model_sd, "optim": optim_sd}
        if meta.get("format_version", 1) == 1:
            states = states[next(iter(states))]  # one component, saved under 'model' / 'optim'
        try:
            with single_process_ok():
                dcp.load(states, checkpoint_id=str(step_dir))
        except (Exception, CheckpointException) as exc:  # DCP: several types, some BaseException
            raise CheckpointError(f"checkpoint {step_dir} cannot be read: {str(exc).splitlines()[0]}") from None
        for component in components:
            state = states if meta.get("format_version", 1) == 1 else states[component.name]
            component.set_states(component.model, component.optimizer, state["model"], state["optim"])
        meta["rank"] = _this_rank_state(meta, self.warn)
        _restore_rng(meta["rank"]["rng"])
        return meta

    def resume(self, components: list[Component]) -> dict | None:
        """Load the newest usable checkpoint; a broken one is skipped with a warning naming it.

        A checkpoint on another base is not broken but the wrong run: that error is raised, not skipped.
        """
        for step_dir in reversed(complete_checkpoints(self.dir)):
            try:
                return self.load(step_dir, components)
            except CheckpointError as exc:
                if "on base" in str(exc):
                    raise
                self.warn(f"{exc}; falling back to the previous checkpoint")
        return None


def _saved_components(meta: dict) -> dict[str, dict]:
    """{component name: {'frozen': [...], 'base': ...}} of a checkpoint (format 1: one component, 'model')."""
    return meta.get("components") or {"model": {"frozen": [], "base": None}}


def _describe(base: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in base.items())
