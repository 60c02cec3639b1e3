"""`load_pretrained`: one entry point for every weight source a user can name in `model.init_from`.

It decides the format from what is on disk (HF directory, .gguf file, llmhpc checkpoint) and
never executes code from a file: pickle-based weights are refused unless explicitly allowed, and
even then are read with `weights_only=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
    from llmhpc.models.hf import config_from_hf, read_pickle_weights, state_dict_from_hf

    hf_state = read_pickle_weights(path, allow_pickle)
    config = path.parent / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: a pickle weight file needs a Hugging Face config.json next to it")
    cfg = config_from_hf(json.loads(config.read_text()), name=path.parent.name)
    model = Llama.from_state_dict(cfg, state_dict_from_hf(hf_state, cfg), dtype=dtype, device=device)
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
                raise FileNotFoundError(f"{checkpoints} holds no complete checkpoint (step_* with meta.json)")
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
    (.bin/.pt/...) raise ValueError unless allow_pickle=True.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected {ACCEPTED})")
    if path.is_file():
        if path.suffix == ".gguf":
            from llmhpc.data.tokenizer import load_tokenizer
            from llmhpc.models.gguf import load_gguf

            model = load_gguf(path, dtype=dtype, device=device)
            return model.eval(), load_tokenizer(str(path))
        if path.suffix in PICKLE_SUFFIXES:
            model, tokenizer = _load_pickle_file(path, dtype, device, allow_pickle)
            return model.eval(), tokenizer
        if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
            path = path.parent
        else:
            raise ValueError(f"{path}: unrecognized model file; accepted: {ACCEPTED}")
    if (path / "config.json").is_file():
        model, tokenizer = _load_hf_dir(path, dtype, device, allow_pickle)
        return model.eval(), tokenizer
    step = _checkpoint_step(path)
    if step is not None:
        model, tokenizer = _load_checkpoint(step, dtype, device)
        return model.eval(), tokenizer
    raise ValueError(f"{path}: not a recognized model directory; accepted: {ACCEPTED}")
