"""What a `model.init_from` path names: an HF directory, a GGUF file, an llmhpc checkpoint or a pickle file.

Recognized from what is on disk, without reading any weights; `load_pretrained` (whole model) and
`load_into` (each rank's shards) both start here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmhpc.errors import InputError

ACCEPTED = (
    "a Hugging Face directory (config.json + model.safetensors), a .gguf file, or an llmhpc checkpoint "
    "(a checkpoints/step_* directory, a checkpoints/ directory or a run directory containing one)"
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _checkpoint_step(path: Path) -> Path | None:
    """The step directory a path designates, or None when it is not an llmhpc checkpoint."""
    if (path / ".metadata").is_file():
        return path
    for checkpoints in (path / "checkpoints", path):
        if checkpoints.is_dir() and any(p.name.startswith("step_") for p in checkpoints.iterdir()):
            from llmhpc.checkpoint import latest_checkpoint  # torch.distributed.checkpoint: only when needed

            step = latest_checkpoint(checkpoints)
            if step is None:
                raise FileNotFoundError(
                    f"{checkpoints}: no complete checkpoint (step_* with meta.json); "
                    "point model.init_from at a run or checkpoint that finished saving"
                )
            return step
    return None


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
