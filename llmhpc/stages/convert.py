"""Recipe: convert a trained model to a deployable format.

    llmhpc convert src=runs/x to=hf dst=exports/x-hf
    llmhpc convert src=runs/x-lora to=hf keep_adapters=true dst=exports/x-hf     # base + dst/adapter (peft)
    llmhpc convert src=runs/x to=trtllm tp=2 dtype=bfloat16 quant=int8_wo dst=exports/x-trt [build_engine=true]
    llmhpc convert src=runs/x to=gguf quant=q8_0 dst=exports/x-q8_0.gguf

The source (an llmhpc run or checkpoint of any parallel layout, an HF directory or a .gguf file) is read tensor
by tensor (`llmhpc.export.source`); each format's writer streams it into a temporary output that is renamed
into place only when complete, with a summary and a lineage record (`llmhpc.export.output`).
"""

from __future__ import annotations

from pathlib import Path

from llmhpc.config import Config, ConfigError
from llmhpc.export.output import ExportSummary, check_destination
from llmhpc.export.source import open_source


def convert(cfg: Config) -> ExportSummary:
    """Run the conversion cfg.convert describes; returns what was written."""
    c = cfg.convert
    if not c.src:
        raise ConfigError("src is not set: name a run directory, checkpoint, HF directory or .gguf file (src=...)")
    if c.keep_adapters and c.to != "hf":
        raise ConfigError(f"keep_adapters=true writes a peft adapter beside an HF base; to={c.to} takes the merged "
                          "model: drop keep_adapters, or use to=hf")
    dst = Path(c.dst).expanduser()
    check_destination(dst, c.overwrite)  # before any reading: a refused destination costs nothing
    source = open_source(c.src, need_tokenizer=c.to == "gguf", keep_adapters=c.keep_adapters)
    if c.to == "hf":
        from llmhpc.export.hf import export_hf as write
    elif c.to == "trtllm":
        from llmhpc.export.trtllm import export_trtllm as write
    else:
        from llmhpc.export.gguf import export_gguf as write
    return write(source, dst, c)


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc convert`: convert, then print the one-line summary."""
    print(convert(cfg).line())
    return 0
