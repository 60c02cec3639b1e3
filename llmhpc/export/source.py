"""Read any weight source tensor by tensor, for the converters: llmhpc checkpoints, HF directories, GGUF files.

Converters never hold more than the tensor they are writing (plus what their format needs to group, e.g. the
fused QKV of one layer): `ExportSource.tensor(name)` reads one full tensor on demand, in llmhpc names and
fp32. An llmhpc checkpoint of any parallel layout (FSDP2 / TP / PP shards, DeepSpeed) is read through DCP one
key at a time, so each stored shard is read once, straight into the full tensor, and nothing is gathered
through processes. Frozen weights a checkpoint does not hold come from the base it references.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import llmhpc
from llmhpc.config.schema import ModelConfig
from llmhpc.errors import InputError
from llmhpc.models.adapters import trained_base
from llmhpc.models.llama import Llama
from llmhpc.models.sources import locate_weights
from llmhpc.peft.lora import LoRAConfig, lora_settings, peft_tensor_name


@dataclass
class ExportSource:
    """One model to export: its shape, its tensors (read on demand), tokenizer and lineage."""

    path: Path
    """The file or directory read (a run directory resolves to its newest complete checkpoint)."""
    format: str
    """'checkpoint', 'hf' or 'gguf'."""
    config: ModelConfig
    reader: Any = field(repr=False)
    """name -> full fp32 tensor (llmhpc names)."""
    tokenizer: Any = field(default=None, repr=False)
    """The model's tokenizer (transformers), or None when the source names none."""
    lineage: dict = field(default_factory=dict)
    """Where the weights come from: source path and format, checkpoint step, config hash, llmhpc version."""
    adapter: Any = field(default=None, repr=False)
    """Opened with keep_adapters=True from a LoRA / DoRA run: () -> (LoRAConfig, {peft tensor name: tensor}), its
    adapters as a peft adapter holds them (the weights `tensor` reads are then the base, unmerged)."""

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None

    def names(self) -> list[str]:
        """Every weight of the model in its order (a tied model has no output.weight)."""
        with torch.device("meta"):
            return list(Llama(self.config).state_dict())

    def tensor(self, name: str) -> torch.Tensor:
        """The full weight `name`, fp32 on CPU."""
        return self.reader(name).to(torch.float32)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.tensor(name)


def config_hash(cfg: ModelConfig) -> str:
    """A short hash of a model config (its shape), for lineage records."""
    import dataclasses

    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def open_source(path: str | Path, *, need_tokenizer: bool = False, keep_adapters: bool = False) -> ExportSource:
    """The model at `path`, ready to be read tensor by tensor.

    `need_tokenizer`: raise InputError when the source names no tokenizer (formats that embed it need one).
    `keep_adapters`: a LoRA / DoRA run's weights are read unmerged and its adapters offered apart
    (`ExportSource.adapter`); InputError for a source without adapters.
    """
    located = locate_weights(path)
    if located.format == "pickle":
        raise InputError(f"{located.path}: a pickle file; convert it to safetensors first (pickle can run code)")
    if keep_adapters and located.format != "checkpoint":
        raise InputError(f"{located.path}: keep_adapters=true needs an llmhpc run trained with peft=lora|qlora, and "
                         f"this is a {located.format} model without adapters; drop keep_adapters")
    if located.format == "checkpoint":
        source = _checkpoint_source(located.path, keep_adapters)
    else:
        source = {"hf": _hf_source, "gguf": _gguf_source}[located.format](located.path)
    source.lineage.update(
        {
            "source": str(located.path.resolve()),
            "format": located.format,
            "config_hash": config_hash(source.config),
            "llmhpc_version": llmhpc.__version__,
        }
    )
    if source.config.score_head:
        raise InputError(f"{located.path}: a reward model (it has a score head); the export formats hold language "
                         "models only: convert the policy it scores, or score with llmhpc.rl.reward_model.RewardScorer")
    if need_tokenizer and source.tokenizer is None:
        raise InputError(
            f"{located.path}: no tokenizer found next to the weights (tokenizer.json); add the "
            "model's tokenizer files, or convert from a source that has one"
        )
    return source


def _hf_source(directory: Path) -> ExportSource:
    from safetensors import safe_open

    from llmhpc.models.hf import hf_tensor_name, read_hf_config, safetensors_weight_map
    from llmhpc.models.loader import hf_tokenizer

    cfg = read_hf_config(directory / "config.json", name=directory.name)
    weight_map = safetensors_weight_map(directory)

    def read(name: str) -> torch.Tensor:
        hf_name = hf_tensor_name(name)
        if hf_name not in weight_map:
            raise InputError(f"{directory}: no tensor {hf_name} in its safetensors files; the export is incomplete")
        with safe_open(str(weight_map[hf_name]), framework="pt") as f:
            return f.get_tensor(hf_name)

    return ExportSource(directory, "hf", cfg, read, hf_tokenizer(directory))


def _gguf_source(path: Path) -> ExportSource:
    import numpy as np

    from llmhpc.data.tokenizer import load_tokenizer
    from llmhpc.models.gguf import gguf_config_and_index, read_gguf_box

    cfg, index = gguf_config_and_index(path)  # the parsed metadata is dropped (~150 MB for a 49k vocabulary)
    file_map = np.memmap(path, mode="r")

    def read(name: str) -> torch.Tensor:
        info = index[name]
        return read_gguf_box(file_map, info, name, cfg, tuple(slice(0, n) for n in info.shape))

    return ExportSource(path, "gguf", cfg, read, load_tokenizer(str(path)))


def _checkpoint_source(step_dir: Path, keep_adapters: bool = False) -> ExportSource:
    from torch.distributed.checkpoint.api import CheckpointException

    from llmhpc.checkpoint import read_checkpoint_config, read_meta
    from llmhpc.checkpoint.manager import stored_shapes, stored_tensor_reader
    from llmhpc.data.tokenizer import load_tokenizer

    run_cfg = read_checkpoint_config(step_dir)
    meta = read_meta(step_dir)
    components = meta.get("components") or {"model": {}}
    component = next(iter(components))
    shapes = stored_shapes(step_dir, component)
    read_tensors = stored_tensor_reader(step_dir, component)
    frozen = set(components[component].get("frozen", []))
    base = _base_reader(run_cfg.model, components[component].get("base"), step_dir) if frozen else None
    fold = _adapter_folder(run_cfg)
    if keep_adapters and fold is None:
        raise InputError(f"{step_dir}: keep_adapters=true, but this run has no adapters (peft={run_cfg.peft.name}); "
                         "drop keep_adapters")

    def read(name: str) -> torch.Tensor:
        weight = base(name) if name in frozen else read_stored(name)
        module = name.removesuffix(".weight")
        if fold is not None and f"{module}.lora_A" in shapes:  # LoRA runs are exported merged, or kept apart
            if keep_adapters:
                return trained_base(module, weight, run_cfg.peft.name == "qlora", run_cfg.parallel.tp)
            dora = f"{module}.lora_magnitude" in shapes
            weight = fold(module, weight, read_stored(f"{module}.lora_A"), read_stored(f"{module}.lora_B"),
                          read_stored(f"{module}.lora_magnitude") if dora else None)
        return weight

    def adapter() -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
        names = [n for n in shapes if ".lora_" in n]
        return lora_settings(run_cfg.peft), {peft_tensor_name(n): read_stored(n) for n in names}

    def read_stored(name: str) -> torch.Tensor:
        if name not in shapes:
            raise InputError(f"{step_dir}: the checkpoint holds no weight {name}; it is not a full model checkpoint")
        try:
            return read_tensors({name: shapes[name]})[name]
        # DCP raises several types for unreadable files; its CheckpointException is a BaseException
        except (Exception, CheckpointException) as exc:
            raise InputError(f"{step_dir}: cannot read {name} ({_dcp_reason(exc)})") from None

    tokenizer = None
    with contextlib.suppress(FileNotFoundError, InputError):
        tokenizer = load_tokenizer(run_cfg.data.tokenizer)
    source = ExportSource(step_dir, "checkpoint", run_cfg.model, read, tokenizer,
                          adapter=adapter if keep_adapters else None)
    source.lineage.update({"step": meta["step"], "run_lineage": meta.get("lineage")})
    return source


def _dcp_reason(exc: BaseException) -> str:
    """The first line of what went wrong in a DCP read (a CheckpointException wraps each rank's error)."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))[0]
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _adapter_folder(run_cfg):
    """For a run trained with peft=lora / qlora: fold(module, weight, A, B, magnitude) -> the merged weight."""
    if run_cfg.peft.name == "none":
        return None
    from llmhpc.models.adapters import fold_adapter, lora_scaling

    scaling = lora_scaling(run_cfg.peft.rank, run_cfg.peft.alpha, run_cfg.peft.rslora)
    qlora, tp = run_cfg.peft.name == "qlora", run_cfg.parallel.tp  # a QLoRA run trained on NF4 values of the base

    def fold(module: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None):
        return fold_adapter(trained_base(module, weight, qlora, tp), a, b, scaling, magnitude)

    return fold


def _base_reader(cfg: ModelConfig, base: dict | None, step_dir: Path):
    """How to read the frozen weights a checkpoint references: its seeded init, or the source it started from."""
    if base is None:
        raise InputError(f"{step_dir}: frozen weights are missing and no base is recorded; export the full model")
    if base.get("source") == "init":
        from llmhpc.models import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(base["seed"]))
            weights = build_model(cfg).state_dict()
        return weights.__getitem__
    from llmhpc.checkpoint.lineage import source_fingerprint

    if source_fingerprint(base["source"]).get("sha256") != base.get("sha256"):
        raise InputError(
            f"{step_dir}: its frozen weights come from {base['source']}, which has changed since; restore that file"
        )
    return open_source(base["source"]).tensor
