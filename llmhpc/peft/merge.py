"""Fold a peft LoRA / DoRA adapter into its base model and write a plain Hugging Face directory.

    python -m llmhpc.peft merge base=PATH adapter=DIR dst=DIR [dtype=auto|float32|bfloat16|float16] [overwrite=true]

base is anything `load_pretrained` reads (HF directory, .gguf file, llmhpc checkpoint); adapter is a directory
with adapter_config.json + adapter_model.safetensors (ours or peft's). The result is a model like any other:
transformers, vLLM and our converters take it with no adapter support. The merge is computed in fp32; dtype
'auto' writes the base's own 16-bit dtype where its config.json records one, else float32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llmhpc.errors import InputError
from llmhpc.peft.lora import load_peft_adapter, merge_lora

USAGE = __doc__.split("\n\n")[1].strip()
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _auto_dtype(base: Path) -> torch.dtype:
    """The base's 16-bit dtype where its config.json says so (an HF directory), else float32."""
    try:
        hf = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    stored = (hf.get("dtype") or hf.get("torch_dtype")) if isinstance(hf, dict) else None
    return _DTYPES[stored] if stored in ("float16", "bfloat16") else torch.float32


def merge_to_hf(
    base: str | Path, adapter: str | Path, dst: str | Path, dtype: str = "auto", overwrite: bool = False
) -> Path:
    """Load `base`, apply and fold the adapter of `adapter`, save to `dst` as an HF directory; returns dst."""
    from llmhpc.models import load_pretrained
    from llmhpc.models.hf import save_hf

    dst = Path(dst)
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose auto, {', '.join(_DTYPES)}")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise InputError(f"{dst}: exists and is not empty; pass overwrite=true or choose another dst")
    model, tokenizer = load_pretrained(base, dtype=torch.float32)
    load_peft_adapter(model, adapter)
    merge_lora(model)
    out_dtype = _auto_dtype(Path(base)) if dtype == "auto" else _DTYPES[dtype]
    return save_hf(model, dst, tokenizer=tokenizer, dtype=out_dtype)


def main(argv: list[str] | None = None) -> int:
    """`merge key=value ...`; 0 on success, 2 for bad arguments, 1 for unusable inputs (one-line error)."""
    from llmhpc.metrics.import_noise import quiet_import_noise

    quiet_import_noise()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "merge" or any("=" not in a for a in args[1:]):
        print(f"usage: {USAGE}", file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    opts = dict(a.split("=", 1) for a in args[1:])
    unknown = set(opts) - {"base", "adapter", "dst", "dtype", "overwrite"}
    missing = {"base", "adapter", "dst"} - set(opts)
    if unknown or missing:
        print(f"error: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}\nusage: {USAGE}", file=sys.stderr)
        return 2
    try:
        out = merge_to_hf(
            opts["base"],
            opts["adapter"],
            opts["dst"],
            opts.get("dtype", "auto"),
            overwrite=opts.get("overwrite", "false").lower() in ("1", "true", "yes"),
        )
    except ValueError as e:  # InputError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, InputError) else 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {opts['adapter']} into {opts['base']} -> {out}")
    return 0
