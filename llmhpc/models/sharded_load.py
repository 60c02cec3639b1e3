"""Load pretrained weights into a model that is already laid out, each rank reading only its own shards.

`model.init_from` under FSDP2 / TP / PP must not hold the whole model on any rank (a 70B model is 280 GB in
fp32), so the model is built on the meta device from the source's shape, laid out, materialized, and only
then filled:

    cfg = model_config_of(path)                         # the source's shape; no weights read
    model = build_model(cfg, device="meta")
    parts = parallelize(model, dims, mesh, parallel)    # pipeline pruning, TP / FSDP2 DTensors
    lineage = load_into(model, path, parts=parts, device=device)  # to_empty, then each rank's shards

(`llmhpc.train.builder.initialize_sharded` does the last step for every stage.)

`load_into` reads one tensor at a time and, of it, only the box this rank holds: for a DTensor parameter the
global indices of its local shard are worked out along each dimension from its placements (Shard, and the
_StridedShard FSDP2 x TP produces, whose indices may be strided), and the bounding box of those indices is
read — `safe_open(...).get_slice(name)[box]` for safetensors, the rows (contiguous runs of blocks) and the
blocks covering the columns for GGUF — then the local indices are picked out of it. An llmhpc checkpoint
goes through DCP, which reads into the sharded state dict directly. The result is bitwise what
`load_pretrained(path)` gives one process, on every layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from llmhpc.config.schema import ModelConfig
from llmhpc.errors import InputError
from llmhpc.models.adapters import adapter_names
from llmhpc.models.llama import SCORE_HEAD, Llama, stored_names
from llmhpc.models.sources import WeightSource, locate_weights

ReadBox = Callable[[str, tuple[slice, ...]], torch.Tensor]
"""(llmhpc tensor name, one slice per dimension) -> those values of the source tensor."""


def model_config_of(path: str | Path) -> ModelConfig:
    """The ModelConfig of the weights at `path` (HF directory, .gguf file or llmhpc checkpoint), reading no weights.

    It is the config `load_pretrained(path)` builds its model from. Pickle weights are refused here already
    (InputError), since `load_into` would refuse them.
    """
    return _config_of(locate_weights(path))


def _config_of(source: WeightSource) -> ModelConfig:
    if source.format == "gguf":
        from llmhpc.models.gguf import open_gguf_config

        return open_gguf_config(source.path)[1]
    if source.format == "hf":
        from llmhpc.models.hf import read_hf_config

        return read_hf_config(source.path / "config.json", name=source.path.name or "hf")
    if source.format == "checkpoint":
        from llmhpc.checkpoint import read_checkpoint_config

        return read_checkpoint_config(source.path).model
    from llmhpc.models.hf import read_pickle_weights

    read_pickle_weights(source.path, allow_pickle=False)  # raises: pickle weights are never loaded shard-wise
    raise AssertionError(f"{source.path}: a pickle file was not refused")


@torch.no_grad()
def load_into(
    model: Llama, path: str | Path, *, parts: Sequence[nn.Module] = (), device: torch.device | str | None = None
) -> dict:
    """Fill the possibly pruned and sharded `model` with the weights at `path`; returns lineage.

    `model` must have been built on the meta device from `model_config_of(path)`, and may then have been
    pruned to pipeline stages and sharded (FSDP2 / TP DTensors) by `llmhpc.parallel.parallelize`, which
    returned `parts`. With `device`, the model (and every part) still on the meta device is materialized here
    with `to_empty(device=device)`, after the source's index is read and its parsed metadata dropped, so the
    two are never in memory together (a GGUF file's parsed metadata is ~160 MB for a 49k-token vocabulary);
    without it, the caller must have materialized them already. Each parameter this rank holds gets its local
    values; those of other pipeline stages are skipped. The RoPE tables are recomputed, and pipeline stages in
    `parts` share them again.

    HF directories (model.safetensors or a sharded model.safetensors.index.json; a tied model's lm_head is not
    needed) and GGUF files are read tensor by tensor, and of each tensor only this rank's box; every rank reads
    on its own, no communication. An llmhpc checkpoint is read through DCP (collective: every rank calls).
    Pickle weights are refused (InputError). Tensors missing from the source, extra ones, or a model whose
    shape is not the source's raise InputError naming the path.

    Returns lineage: {"init_from": path as given, "format": "hf" | "gguf" | "checkpoint", "source": the file or
    directory read, and "files": {name: bytes} of the weight files, or "step" for a checkpoint}.
    """
    source = locate_weights(path)
    lineage = {"init_from": str(path), "format": source.format, "source": str(source.path.resolve())}
    if source.format == "checkpoint":
        from llmhpc.checkpoint import load_model_state, read_meta

        _materialize(model, parts, device)
        meta = read_meta(source.path)
        component = next(iter(meta.get("components") or {"model": {}}))
        base = (meta.get("components") or {}).get(component, {})
        if base.get("frozen"):  # saved without its frozen weights: rebuild them from the base it references first
            _fill_base(model, base["base"], source.path)
        # DCP reads each rank's shards of the sharded state dict
        from llmhpc.checkpoint.manager import stored_shapes

        stored = set(stored_shapes(source.path, component))
        load_model_state(source.path, model, aliases=stored_names(model), skip=_added_on_top(model, stored))
        lineage["step"] = meta["step"]
    else:
        with _open_source(source, model.cfg) as (read_box, shapes, files):
            _check_names(source, model.cfg, shapes)
            _materialize(model, parts, device)
            stored = set(shapes)
            aliases = stored_names(model)  # a pipeline's tied head copy reads the embedding
            added = _added_on_top(model, stored)
            for param_name, param in model.named_parameters():
                if param_name in added:
                    continue
                name = aliases.get(param_name, param_name)
                if tuple(param.shape) != shapes[name]:
                    raise InputError(f"{source.path}: {name} is {list(shapes[name])} there but {list(param.shape)} "
                                     "in the model; build the model from model_config_of(path)")
                _fill_own_shard(param, lambda box, n=name: read_box(n, box))
        lineage["files"] = {f.name: f.stat().st_size for f in sorted(files)}
    if model.cfg.score_head:
        lineage["score_head"] = "loaded" if SCORE_HEAD in stored else "new"
    model.init_rope()
    for part in parts:
        if part is not model:
            part.share_rope_tables(model)
    return lineage


def _added_on_top(model: Llama, stored: set[str]) -> set[str]:
    """Parameters a source need not hold, left for whoever added them to draw: adapters, and a score head when
    the source has none (a reward model started from a language model)."""
    names = adapter_names(model)
    if model.cfg.score_head and SCORE_HEAD not in stored:
        names.add(SCORE_HEAD)
    return names


def _fill_base(model: Llama, base: dict, checkpoint: Path) -> None:
    """The frozen weights of a checkpoint that does not hold them: its seeded init, or the weights it started from
    (checked against the fingerprint the checkpoint recorded, so other weights at that path are refused)."""
    if base.get("source") == "init":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(base["seed"]))
            model.init_weights()
        return
    from llmhpc.checkpoint.lineage import source_fingerprint

    found = source_fingerprint(base["source"])
    if found["sha256"] != base.get("sha256"):
        raise InputError(f"{checkpoint}: its frozen weights come from {base['source']}, which has changed since "
                         f"(sha256 {found['sha256'][:12]} instead of {str(base.get('sha256'))[:12]}); restore it")
    load_into(model, base["source"])


def _materialize(model: nn.Module, parts: Sequence[nn.Module], device: torch.device | str | None) -> None:
    """`to_empty` the model and its pipeline stages on `device` (FSDP2 re-registers the parameters it manages on
    each stage's root module, so both are needed); without a device they must be materialized already."""
    if device is not None:
        model.to_empty(device=device)
        for part in parts:
            if part is not model:
                part.to_empty(device=device)
    if any(p.device.type == "meta" for part in (model, *parts) for p in part.parameters()):
        raise ValueError("load_into: the model is still on the meta device; pass device= or call to_empty first")


@contextlib.contextmanager
def _open_source(source: WeightSource, cfg: ModelConfig) -> Iterator[tuple[ReadBox, dict, set[Path]]]:
    """(read_box, {llmhpc name: shape}, weight files) of an HF directory or a GGUF file, open for reading."""
    if source.format == "gguf":
        import numpy as np

        from llmhpc.models.gguf import gguf_tensor_index, read_gguf_box

        index = gguf_tensor_index(source.path)  # the parsed file is gone once this returns
        file_map = np.memmap(source.path, mode="r")
        yield ((lambda name, box: read_gguf_box(file_map, index[name], name, cfg, box)),
               {name: info.shape for name, info in index.items()}, {source.path})
        return
    if source.format != "hf":
        _config_of(source)  # pickle: refused there
    from safetensors import safe_open

    from llmhpc.models.hf import hf_tensor_name, safetensors_weight_map, state_dict_from_hf

    weight_map = safetensors_weight_map(source.path)
    try:  # validates the names as load_pretrained does (unexpected tensors refused, a tied lm_head dropped)
        kept = set(state_dict_from_hf(dict.fromkeys(weight_map), cfg))
    except InputError as e:
        raise InputError(f"{source.path}: {e}") from None
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(file: Path):
            if file not in handles:
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: not found; the model.safetensors.index.json lists it")
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            return handles[file]

        def read_box(name: str, box: tuple[slice, ...]) -> torch.Tensor:
            hf_name = hf_tensor_name(name)
            return handle(weight_map[hf_name]).get_slice(hf_name)[box]

        shapes = {}
        for name in kept:
            hf_name = hf_tensor_name(name)
            shapes[name] = tuple(handle(weight_map[hf_name]).get_slice(hf_name).get_shape())
        yield read_box, shapes, set(weight_map.values())


def _check_names(source: WeightSource, cfg: ModelConfig, shapes: dict) -> None:
    """The source holds exactly the whole model's tensors (what a strict load_state_dict would demand)."""
    with torch.device("meta"):
        expected = set(Llama(cfg).state_dict()) - ({SCORE_HEAD} - set(shapes))  # a score head may start fresh
    missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
    if missing or extra:
        raise InputError(f"{source.path}: the weights do not fit its config (missing {missing[:5]}, "
                         f"unexpected {extra[:5]}); use the config of these weights")


def _local_indices(param: torch.Tensor) -> list[torch.Tensor]:
    """Per dimension, the global indices of this rank's local values, in their local order (CPU int64).

    Sharding of different tensor dimensions is independent, so the indices along dimension d are those of
    `arange(size_d)` laid out with only the placements that shard d, which `distribute_tensor` computes with
    exactly the DTensor's own rules (uneven chunks, _StridedShard), locally (src_data_rank=None).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(param, DTensor):
        return [torch.arange(size) for size in param.shape]
    device = param.to_local().device
    indices = []
    for dim, size in enumerate(param.shape):
        placements = []
        for placement in param.placements:
            if isinstance(placement, _StridedShard) and placement.dim % param.ndim == dim:
                placements.append(_StridedShard(0, split_factor=placement.split_factor))
            elif isinstance(placement, Shard) and placement.dim % param.ndim == dim:
                placements.append(Shard(0))
            elif placement.is_partial():
                raise ValueError(f"a parameter with a Partial placement ({param.placements}) cannot be loaded")
            else:
                placements.append(Replicate())
        arange = torch.arange(size, device=device)
        indices.append(distribute_tensor(arange, param.device_mesh, placements, src_data_rank=None).to_local().cpu())
    return indices


def _fill_own_shard(param: torch.Tensor, read_box: Callable[[tuple[slice, ...]], torch.Tensor]) -> None:
    """Copy this rank's part of a source tensor into `param`, reading only the bounding box of that part."""
    from torch.distributed.tensor import DTensor

    local = param.to_local() if isinstance(param, DTensor) else param
    if local.numel() == 0:
        return
    indices = _local_indices(param)
    box = tuple(slice(int(index.min()), int(index.max()) + 1) for index in indices)
    values = read_box(box)
    for dim, (index, span) in enumerate(zip(indices, box, strict=True)):
        if len(index) != span.stop - span.start or not torch.equal(index, torch.arange(span.start, span.stop)):
            values = values.index_select(dim, index - span.start)  # strided local part: keep its own values
    local.copy_(values)
