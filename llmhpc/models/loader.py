"""`load_pretrained`: one entry point for every weight source a user can name in `model.init_from`.

It decides the format from what is on disk (HF directory, .gguf file, llmhpc checkpoint) and
never executes code from a file: pickle-based weights are refused unless explicitly allowed, and
even then are read with `weights_only=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmhpc.errors import InputError
from llmhpc.models.llama import Llama

ACCEPTED = (
    "a Hugging Face directory (config.json + model.safetensors), a .gguf file, or an llmhpc checkpoint "
    "(a checkpoints/step_* directory, a checkpoints/ directory or a run directory containing one)"
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _hf_tokenizer(directory: Path):
    from llmhpc.data.tokenizer import load_tokenizer

    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return load_tokenizer(str(directory))
    return None


def _load_hf_dir(directory: Path, dtype, device, allow_pickle: bool):
    from llmhpc.models.hf import load_hf

    model = load_hf(directory, dtype=dtype, device=device, allow_pickle=allow_pickle)
    return model, _hf_tokenizer(directory)


def _load_pickle_file(path: Path, dtype, device, allow_pickle: bool):
    from llmhpc.models.hf import model_from_hf_state, read_hf_config, read_pickle_weights

    hf_state = read_pickle_weights(path, allow_pickle)
    config = path.parent / "config.json"
    if not config.is_file():
        raise InputError(f"{path}: a pickle weight file needs a Hugging Face config.json next to it; add one")
    cfg = read_hf_config(config, name=path.parent.name)
    model = model_from_hf_state(path, cfg, hf_state, dtype=dtype, device=device)
    return model, _hf_tokenizer(path.parent)


def _checkpoint_step(path: Path) -> Path | None:
    """The step directory a path designates, or None when it is not an llmhpc checkpoint."""
    from llmhpc.checkpoint import latest_checkpoint

    if (path / ".metadata").is_file():
        return path
    for checkpoints in (path / "checkpoints", path):
        if checkpoints.is_dir() and any(p.name.startswith("step_") for p in checkpoints.iterdir()):
            step = latest_checkpoint(checkpoints)
            if step is None:
                raise FileNotFoundError(
                    f"{checkpoints}: no complete checkpoint (step_* with meta.json); "
                    "point model.init_from at a run or checkpoint that finished saving"
                )
            return step
    return None


def _load_checkpoint(step_dir: Path, dtype, device):
    from llmhpc.checkpoint import load_model_state, read_checkpoint_config
    from llmhpc.data.tokenizer import load_tokenizer

    cfg = read_checkpoint_config(step_dir)
    with torch.device("meta"):
        model = Llama(cfg.model)
    model.to_empty(device=device)
    model.init_rope()
    load_model_state(step_dir, model)
    return model.to(dtype), load_tokenizer(cfg.data.tokenizer)


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
):
    """(model, tokenizer) from an HF directory, a .gguf file or an llmhpc checkpoint.

    The tokenizer is None for an HF directory without tokenizer files. Pickle weights
    (.bin/.pt/...) raise InputError unless allow_pickle=True; so does any file that cannot be read
    as a model, with the path first in the message.
    """
    source = locate_weights(path)
    if source.format == "gguf":
        from llmhpc.data.tokenizer import load_tokenizer
        from llmhpc.models.gguf import load_gguf

        model = load_gguf(source.path, dtype=dtype, device=device)
        return model.eval(), load_tokenizer(str(source.path))
    if source.format == "pickle":
        model, tokenizer = _load_pickle_file(source.path, dtype, device, allow_pickle)
    elif source.format == "hf":
        model, tokenizer = _load_hf_dir(source.path, dtype, device, allow_pickle)
    else:
        model, tokenizer = _load_checkpoint(source.path, dtype, device)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class WeightSource:
    """What a `model.init_from` path names, recognized from what is on disk (no weights read)."""

    format: str
    """'hf' (a directory with config.json), 'gguf' (a .gguf file), 'checkpoint' (an llmhpc step directory)
    or 'pickle' (a .bin/.pt/... file, which needs a config.json next to it)."""
    path: Path
    """The HF directory (also for a named .safetensors file), the .gguf or pickle file, or the checkpoint's
    step directory (the newest complete one of a run or checkpoints/ directory)."""


def locate_weights(path: str | Path) -> WeightSource:
    """Recognize the weight source at `path` as `load_pretrained` does, without reading any weights.

    Raises FileNotFoundError when nothing is there (or a checkpoints/ directory has no complete step),
    InputError when it is not a model `load_pretrained` accepts.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; model.init_from must be {ACCEPTED}")
    if path.is_file():
        if path.suffix == ".gguf":
            return WeightSource("gguf", path)
        if path.suffix in PICKLE_SUFFIXES:
            return WeightSource("pickle", path)
        if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
            path = path.parent
        else:
            raise InputError(f"{path}: unrecognized model file; use {ACCEPTED}")
    if (path / "config.json").is_file():
        return WeightSource("hf", path)
    step = _checkpoint_step(path)
    if step is not None:
        return WeightSource("checkpoint", step)
    raise InputError(f"{path}: not a recognized model directory; use {ACCEPTED}")
