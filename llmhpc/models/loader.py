"""`load_pretrained`: one entry point for every weight source a user can name in `model.init_from`.

It decides the format from what is on disk (HF directory, .gguf file, llmhpc checkpoint) and
never executes code from a file: pickle-based weights are refused unless explicitly allowed, and
even then are read with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmhpc.errors import InputError
from llmhpc.models.adapters import fold_adapter, is_adapter_parameter, lora_scaling, trained_base
from llmhpc.models.llama import Llama
from llmhpc.models.sources import locate_weights

if TYPE_CHECKING:
    from llmhpc.config import Config

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def hf_tokenizer(directory: Path):
    """The tokenizer saved in an HF model directory, or None when it holds no tokenizer files."""
    from llmhpc.data.tokenizer import load_tokenizer

    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return load_tokenizer(str(directory))
    return None


def _load_hf_dir(directory: Path, dtype, device, allow_pickle: bool):
    from llmhpc.models.hf import load_hf

    model = load_hf(directory, dtype=dtype, device=device, allow_pickle=allow_pickle)
    return model, hf_tokenizer(directory)


def _load_pickle_file(path: Path, dtype, device, allow_pickle: bool):
    from llmhpc.models.hf import model_from_hf_state, read_hf_config, read_pickle_weights

    hf_state = read_pickle_weights(path, allow_pickle)
    config = path.parent / "config.json"
    if not config.is_file():
        raise InputError(f"{path}: a pickle weight file needs a Hugging Face config.json next to it; add one")
    cfg = read_hf_config(config, name=path.parent.name)
    model = model_from_hf_state(path, cfg, hf_state, dtype=dtype, device=device)
    return model, hf_tokenizer(path.parent)


def _load_checkpoint(step_dir: Path, dtype, device):
    """An llmhpc checkpoint's first component, with the frozen base it references rebuilt first (`load_into`)."""
    from llmhpc.checkpoint import read_checkpoint_config
    from llmhpc.data.tokenizer import load_tokenizer
    from llmhpc.models.sharded_load import load_into

    cfg = read_checkpoint_config(step_dir)
    with torch.device("meta"):
        model = Llama(cfg.model)
    load_into(model, step_dir, device=device)
    if cfg.peft.name != "none":  # the adapters it trained, folded into the frozen base they were trained on
        _fold_stored_adapters(model, step_dir, lora_scaling(cfg.peft.rank, cfg.peft.alpha, cfg.peft.rslora),
                              qlora=cfg.peft.name == "qlora", tp=cfg.parallel.tp)
    return model.to(dtype), load_tokenizer(cfg.data.tokenizer)


@torch.no_grad()
def _fold_stored_adapters(model: Llama, step_dir: Path, scaling: float, qlora: bool, tp: int) -> None:
    """Fold each adapter a checkpoint holds (`<module>.lora_A` / `lora_B` [/ `lora_magnitude`]) into the module's
    weight, which holds the base (first rounded to NF4 as the run's `tp` ranks did, for a QLoRA run)."""
    from llmhpc.checkpoint.manager import stored_shapes, stored_tensor_reader

    shapes = stored_shapes(step_dir)
    adapters = stored_tensor_reader(step_dir)(
        {k: v for k, v in shapes.items() if is_adapter_parameter(k)})
    for key in adapters:
        if key.endswith(".lora_A"):
            module = key.removesuffix(".lora_A")
            weight = model.get_parameter(f"{module}.weight")
            base = trained_base(module, weight, qlora, tp)
            weight.copy_(fold_adapter(base, adapters[key], adapters[f"{module}.lora_B"], scaling,
                                      adapters.get(f"{module}.lora_magnitude")))


def tokenizer_spec(path: str | Path) -> str | None:
    """What `llmhpc.data.tokenizer.load_tokenizer` takes for the tokenizer of the model at `path` (a .gguf file,
    an HF directory with tokenizer files, or the tokenizer an llmhpc checkpoint was trained with); None if the
    source has none."""
    source = locate_weights(path)
    if source.format == "gguf":
        return str(source.path)
    if source.format in ("hf", "pickle"):
        directory = source.path if source.path.is_dir() else source.path.parent
        return str(directory) if any((directory / name).is_file() for name in _TOKENIZER_FILES) else None
    return run_config(path).data.tokenizer


def run_config(path: str | Path) -> Config | None:
    """The config an llmhpc checkpoint at `path` (a run or one of its steps) was trained with; None for an HF
    directory, a .gguf or a pickle file."""
    from llmhpc.checkpoint import read_checkpoint_config

    source = locate_weights(path)
    return read_checkpoint_config(source.path) if source.format == "checkpoint" else None


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
