"""`llmhpc convert to=hf`: a Hugging Face directory that transformers, vLLM, SGLang and TensorRT-LLM load as-is.

    dst/
        config.json                      LlamaForCausalLM: shape, RoPE (incl. Llama-3 scaling), tied embeddings,
                                         dtype, bos / eos / pad ids of the tokenizer
        generation_config.json           bos / eos / pad ids
        model.safetensors                the weights; above shard_size_gb instead
          or model-0000N-of-0000M.safetensors + model.safetensors.index.json (metadata.total_size, weight_map)
        tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
        lineage.json                     where the weights come from and how they were converted
        adapter/                         keep_adapters=true: adapter_config.json + adapter_model.safetensors (peft)

The weights stream: each tensor is read from the source (`ExportSource.tensor`, one at a time) and written
straight into its safetensors file, whose header is known in advance from the model's shapes, so memory holds
one tensor, never the model. The directory is written next to dst and renamed into place only when complete.

dtype: 'auto' keeps what the source stores where that is known and 16-bit: an HF source's config.json dtype
(float16 / bfloat16). Everything else is written in float32: llmhpc checkpoints hold fp32 master weights (also
after precision=bf16 training), and GGUF tensors dequantize to fp32, so float32 is the exact copy. Ask for
dtype=bfloat16 or float16 to halve the size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

from llmhpc.config.schema import ConvertConfig
from llmhpc.errors import InputError
from llmhpc.export.output import ExportSummary, atomic_output, file_sizes, progress, write_lineage
from llmhpc.export.source import ExportSource
from llmhpc.models.hf import write_hf_config, write_hf_weights
from llmhpc.models.llama import Llama
from llmhpc.peft.lora import write_peft_adapter

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(source: ExportSource, requested: str) -> torch.dtype:
    """The dtype to write: `requested`, or for 'auto' the source's 16-bit dtype where it records one, else fp32."""
    if requested != "auto":
        return _DTYPES[requested]
    if source.format == "hf":
        with contextlib.suppress(OSError, ValueError, AttributeError):
            hf = json.loads((Path(source.path) / "config.json").read_text(encoding="utf-8"))
            stored = hf.get("dtype") or hf.get("torch_dtype")
            if stored in ("float16", "bfloat16"):
                return _DTYPES[stored]
    return torch.float32


def export_hf(source: ExportSource, dst: Path, options: ConvertConfig) -> ExportSummary:
    """Write `source` as a Hugging Face Llama directory at `dst` (see the module docstring); returns the summary.

    Refuses an existing dst unless options.overwrite; on any error nothing is left at dst (an old dst stays).
    """
    start = time.perf_counter()
    dst = Path(dst)
    dtype = resolve_dtype(source, options.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Llama(source.config).state_dict().items()}
    summary = ExportSummary(dst, "hf", dtype_name, "none")

    def read(name: str) -> torch.Tensor:
        tensor = source.tensor(name)
        if tuple(tensor.shape) != shapes[name]:
            raise InputError(
                f"{source.path}: {name} has shape {tuple(tensor.shape)}, but its config makes it "
                f"{shapes[name]}; the weights do not belong to this config"
            )
        return tensor

    def written(name: str) -> None:
        summary.tensors += 1
        bar.update(1)

    with atomic_output(dst, options.overwrite) as tmp:
        tmp.mkdir(exist_ok=True)  # a dst with a dot in its name is still a directory here
        bar = progress(len(shapes), f"hf {dtype_name}")
        try:
            write_hf_weights(tmp, shapes, read, dtype, int(options.shard_size_gb * 10**9), on_tensor=written)
        finally:
            bar.close()
        write_hf_config(tmp, source.config, dtype, source.tokenizer)
        if source.adapter is not None:
            lora, tensors = source.adapter()
            write_peft_adapter(lora, {k: v.to(dtype) for k, v in tensors.items()}, tmp / "adapter", str(dst))
            summary.tensors += len(tensors)
        summary.files = file_sizes(tmp)
        summary.seconds = time.perf_counter() - start
        write_lineage(tmp, dst, source.lineage, summary, dataclasses.asdict(options))
        summary.files = file_sizes(tmp)
    summary.seconds = time.perf_counter() - start
    return summary
