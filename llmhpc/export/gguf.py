"""`llmhpc convert to=gguf`: one GGUF v3 file for llama.cpp (and Ollama), an Ollama Modelfile, a lineage record.

    llmhpc convert src=runs/x to=gguf dst=exports/x.gguf                  # float16 (dtype=auto)
    llmhpc convert src=runs/x to=gguf quant=q4_k dst=exports/x-q4_k.gguf  # + exports/x-q4_k.Modelfile

What is written follows llama.cpp's own converter (convert_hf_to_gguf.py, LlamaModel) and quantizer
(llama-quant.cpp), through gguf-py's constants and GGUFWriter:

- metadata: general.architecture=llama, general.name, llama.{context_length, embedding_length, block_count,
  feed_forward_length, attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon,
  rope.freq_base, rope.dimension_count, vocab_size} (+ attention.key_length / value_length for an explicit
  head_dim), general.file_type; Llama 3 RoPE scaling as llama.cpp carries it: a `rope_freqs.weight` tensor of
  per-frequency divisors, no rope.scaling.* keys;
- tokenizer: tokenizer.ggml.model=gpt2 (byte-level BPE), .pre (llama.cpp's name of the pre-tokenizer's
  split rules), .tokens / .token_type (CONTROL for special added tokens, USER_DEFINED for other added ones,
  [PAD{i}] UNUSED for ids the tokenizer lacks) / .merges, bos / eos / unknown / padding ids, add_bos /
  add_eos (from what the tokenizer actually does), add_space_prefix, and tokenizer.chat_template;
- tensors in llama.cpp's names (`llmhpc.models.gguf`, shared with the reader), Q and K rows permuted as
  llama.cpp's converter does (the inverse of the reader's `unpermute_qk`), no output.weight for tied
  embeddings.

Tensor types. dtype picks the float type of the matrices: float32, float16 or bfloat16; 'auto' is float16,
llama.cpp's converter default (the CPU and GPU kernels llama.cpp and Ollama run fastest). Norms and
rope_freqs are always float32, as in llama.cpp. quant=q8_0 / q4_0 / q4_k quantizes every matrix whose rows
are a multiple of the type's block, with llama.cpp's choices:

- q8_0: every matrix Q8_0 (convert_hf_to_gguf.py --outtype q8_0, token_embd and output included);
- q4_0 / q4_k: Q4_0 / Q4_K (llama-quantize Q4_0 / Q4_K_S), except the output projection (the token
  embedding when tied: it is the output projection too), which llama-quantize raises to Q6_K; gguf-py cannot
  write Q6_K, so it is Q8_0 here (more precise than Q6_K, 6% larger model at SmolLM2's size). llama-quantize
  Q4_K_S also raises attn_v of the first 4 blocks and ffn_down of the first n_layers/8 to Q5_K; those stay
  Q4_K here. Every other tensor is byte for byte what llama-quantize writes from the same float16 file
  (tests/integration/test_convert_gguf.py checks it against llama.cpp's own quantizer);
- a matrix whose rows do not fit the block falls back as llama-quantize does: Q4_K -> Q5_0 (blocks of 32),
  then the float type of dtype (llama.cpp: float16, the 'auto' default). For Q8_0 and Q4_0 llama-quantize
  refuses such a file; convert_hf_to_gguf.py --outtype q8_0 falls back to float16, as here.

Q8_0, Q4_0, Q5_0 and Q4_K come from `llmhpc.export.gguf_quants` (ggml's reference quantizers compiled by numba:
the bytes of gguf-py's numpy ones, 3-15x faster), BF16 from gguf-py's `gguf.quants.quantize`.
The file is streamed: tensor infos first (shapes and types are known from the config), then each tensor is
read from the source, converted and written before the next is read.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from llmhpc.config.schema import ConvertConfig, ModelConfig
from llmhpc.errors import InputError
from llmhpc.export.gguf_quants import quantize_legacy, quantize_q4_k
from llmhpc.export.ollama import modelfile_text
from llmhpc.export.output import ExportSummary, atomic_output, check_destination, progress, write_lineage
from llmhpc.export.source import ExportSource
from llmhpc.models.gguf import ROPE_FREQS, gguf_tensor_name, llama3_rope_factors, permute_qk
from llmhpc.models.llama import Llama, head_dim_of

Q = GGMLQuantizationType

FLOAT_TYPES = {"auto": Q.F16, "float16": Q.F16, "float32": Q.F32, "bfloat16": Q.BF16}
"""dtype -> the type of the matrices (and of quantization fallbacks)."""
QUANT_TYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K}
"""quant -> the type of the matrices."""
FILE_TYPES = {
    Q.F32: LlamaFileType.ALL_F32,
    Q.F16: LlamaFileType.MOSTLY_F16,
    Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
}
"""general.file_type: llama.cpp's label of the file's main type (Q4_K everywhere but the output is Q4_K_S)."""

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The split regex of Llama 3's tokenizer.json (llama.cpp pre-tokenizer 'llama-bpe')."""


@dataclass
class PlannedTensor:
    """One tensor of the file: its name and type, and where its values come from."""

    name: str
    """llama.cpp's name."""
    shape: tuple[int, ...]
    """torch order (rows, cols)."""
    qtype: GGMLQuantizationType
    source_name: str | None = None
    """The llmhpc weight it is (None: `values` holds it)."""
    values: np.ndarray | None = None

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def tensor_type(
    name: str, shape: tuple[int, ...], float_type: GGMLQuantizationType, quant: str, tied: bool
) -> GGMLQuantizationType:
    """The GGUF type of the tensor `name` (llama.cpp's name) under dtype / quant (see the module docstring)."""
    if len(shape) < 2 or name.endswith("_norm.weight") or name == ROPE_FREQS:
        return Q.F32
    if quant == "none":
        return float_type
    wanted = QUANT_TYPES[quant]
    if quant != "q8_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        wanted = Q.Q8_0  # llama-quantize: Q6_K, which gguf-py cannot write
    cols = shape[-1]
    if cols % GGML_QUANT_SIZES[wanted][0] == 0:
        return wanted
    if wanted == Q.Q4_K and cols % GGML_QUANT_SIZES[Q.Q5_0][0] == 0:
        return Q.Q5_0
    return float_type


def plan_tensors(
    cfg: ModelConfig, names: list[str], shapes: dict[str, tuple[int, ...]], dtype: str, quant: str
) -> list[PlannedTensor]:
    """Every tensor of the file, in llama.cpp's converter order: rope_freqs (if any) first, then the weights."""
    plan = []
    if cfg.rope_scaling.type == "llama3":
        factors = llama3_rope_factors(head_dim_of(cfg), cfg.rope_theta, cfg.rope_scaling)
        plan.append(PlannedTensor(ROPE_FREQS, tuple(factors.shape), Q.F32, values=factors))
    elif cfg.rope_scaling.type != "none":
        raise InputError(f"rope_scaling.type={cfg.rope_scaling.type!r} has no GGUF form; export to=hf instead")
    for name in names:
        gguf_name = gguf_tensor_name(name)
        shape = tuple(shapes[name])
        qtype = tensor_type(gguf_name, shape, FLOAT_TYPES[dtype], quant, cfg.tie_embeddings)
        plan.append(PlannedTensor(gguf_name, shape, qtype, source_name=name))
    return plan


def encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """fp32 values [rows, cols] in the bytes (or float array) GGUF stores for `qtype`."""
    if qtype == Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)  # round to nearest even, as ggml's own conversion
    if qtype == Q.Q4_K:
        return quantize_q4_k(values)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
        return quantize_legacy(values, qtype.name.lower())
    return quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def _tensor_values(planned: PlannedTensor, source: ExportSource, cfg: ModelConfig) -> np.ndarray:
    if planned.values is not None:
        return planned.values
    weight = source.tensor(planned.source_name)
    if planned.source_name.endswith("attention.wq.weight"):
        weight = permute_qk(weight, cfg.n_heads)
    elif planned.source_name.endswith("attention.wk.weight"):
        weight = permute_qk(weight, cfg.n_kv_heads)
    return weight.contiguous().numpy()


# ---- tokenizer ---------------------------------------------------------------------------------------------


@dataclass
class GGUFTokenizer:
    """The tokenizer.* metadata of a byte-level BPE tokenizer."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    """'bos' / 'eos' / 'unk' / 'pad' -> id (only those the tokenizer defines)."""
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | dict | None


def _pre_tokenizer_name(pre: dict | None) -> tuple[str, bool] | None:
    """(llama.cpp's pre-tokenizer name, add_prefix_space) of a tokenizer.json pre_tokenizer, or None."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1]
    if kinds[-1] != "ByteLevel":
        return None
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2", bool(last.get("add_prefix_space"))
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return "smollm", bool(last.get("add_prefix_space"))  # llama.cpp: \p{N} split, then GPT-2's regex
    if (
        kinds == ["Split", "ByteLevel"]
        and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
        and str(steps[0].get("behavior", "")).lower() == "isolated"
        and not steps[0].get("invert")
        and not last.get("use_regex", True)
    ):
        return "llama-bpe", bool(last.get("add_prefix_space"))
    return None


def gguf_tokenizer(tokenizer, vocab_size: int) -> GGUFTokenizer:
    """The GGUF form of a transformers fast tokenizer, or InputError naming what llama.cpp could not reproduce."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError("the source's tokenizer is not a fast (tokenizer.json) tokenizer; GGUF export needs one")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise InputError(
            f"the source's tokenizer is {model.get('type')}"
            f"{' with byte fallback (sentencepiece style)' if model.get('byte_fallback') else ''}; "
            "GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model=gpt2) only"
        )
    if spec.get("normalizer") is not None:
        raise InputError(
            f"the source's tokenizer normalizes text ({spec['normalizer'].get('type')}), which "
            "llama.cpp's byte-level BPE does not; GGUF export would tokenize differently"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise InputError(
            f"the source tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} "
            "is not one llama.cpp names (gpt-2, smollm, llama-bpe); GGUF export would tokenize "
            "differently"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise InputError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
            "embeddings; use the model's own tokenizer"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        token = by_id[i]
        tokens.append(token)
        if i in added:  # llama.cpp: special, or looks like a control token (<|...|>) -> CONTROL
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special_ids = {
        key: int(getattr(tokenizer, f"{key}_token_id"))
        for key in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{key}_token_id", None) is not None
    }
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = "bos" in special_ids and len(full) > len(plain) and full[0] == special_ids["bos"]
    add_eos = "eos" in special_ids and len(full) > len(plain) and full[-1] == special_ids["eos"]
    return GGUFTokenizer(
        pre[0], tokens, types, merges, special_ids, add_bos, add_eos, pre[1], getattr(tokenizer, "chat_template", None)
    )


def _write_metadata(writer: GGUFWriter, cfg: ModelConfig, tok: GGUFTokenizer, file_type: int) -> None:
    writer.add_type("model")
    writer.add_name(cfg.name)
    writer.add_basename(cfg.name)  # what llmhpc's reader names the config from
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.head_dim is not None:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim_of(cfg))
    writer.add_quantization_version(GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.token_types)
    writer.add_token_merges(tok.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in tok.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(tok.add_eos)
    writer.add_add_space_prefix(tok.add_space_prefix)
    if isinstance(tok.chat_template, dict):  # named templates: 'default' + tokenizer.chat_template.<name>
        writer.add_chat_template([{"name": k, "template": v} for k, v in tok.chat_template.items()])
    elif tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# ---- the export --------------------------------------------------------------------------------------------


def modelfile_path(dst: Path) -> Path:
    """Where the Ollama Modelfile of a GGUF export goes: x.gguf -> x.Modelfile beside it."""
    return dst.with_suffix(".Modelfile")


def export_gguf(source: ExportSource, dst: Path, c: ConvertConfig) -> ExportSummary:
    """Write `source` as the GGUF file `dst` (+ its Modelfile and lineage); see the module docstring."""
    start = time.perf_counter()
    dst = Path(dst)
    if dst.suffix != ".gguf":
        raise InputError(f"dst={dst}: a GGUF export is one file; name it with the .gguf suffix, e.g. {dst}.gguf")
    modelfile = modelfile_path(dst)
    check_destination(dst, c.overwrite)
    check_destination(modelfile, c.overwrite)
    if source.tokenizer is None:
        raise InputError(f"{source.path}: no tokenizer found next to the weights; a GGUF file embeds one")
    cfg = source.config
    tok = gguf_tokenizer(source.tokenizer, cfg.vocab_size)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Llama(cfg).state_dict().items()}
    plan = plan_tensors(cfg, source.names(), shapes, c.dtype, c.quant)
    main_type = QUANT_TYPES[c.quant] if c.quant != "none" else FLOAT_TYPES[c.dtype]
    dtype_name = {Q.F32: "float32", Q.F16: "float16", Q.BF16: "bfloat16"}[FLOAT_TYPES[c.dtype]]
    summary = ExportSummary(dst, "gguf", dtype_name, c.quant, tensors=len(plan))
    modelfile_body = modelfile_text(dst.name, source.tokenizer)

    with atomic_output(dst, c.overwrite) as tmp:
        writer = GGUFWriter(None, "llama")
        try:
            _write_metadata(writer, cfg, tok, FILE_TYPES[main_type])
            for t in plan:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.qtype)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with progress(len(plan), f"gguf {dst.name}") as bar:
                for t in plan:  # one tensor in memory at a time
                    writer.write_tensor_data(encode(_tensor_values(t, source, cfg), t.qtype))
                    bar.update()
        finally:
            writer.close()
        gguf_bytes = tmp.stat().st_size
    tmp_modelfile = modelfile.with_name(f".tmp-{modelfile.name}-{uuid.uuid4().hex[:8]}")
    tmp_modelfile.write_text(modelfile_body, encoding="utf-8")
    tmp_modelfile.replace(modelfile)
    summary.files = {dst.name: gguf_bytes, modelfile.name: modelfile.stat().st_size}
    summary.seconds = time.perf_counter() - start
    types: dict[str, int] = {}
    for t in plan:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    write_lineage(
        dst,
        dst,
        source.lineage,
        summary,
        {"dtype": c.dtype, "quant": c.quant, "tensor_types": types, "tokenizer_pre": tok.pre},
    )
    return summary
