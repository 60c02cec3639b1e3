"""Read a llama.cpp GGUF file into an llmhpc Llama: metadata -> config, tensors dequantized to fp32.

llama.cpp stores the query/key projection rows interleaved for its own RoPE layout; they are put
back into Hugging Face's rotate-half order here so the model needs no special case. transformers'
GGUF loader is the reference this is tested against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from llmhpc.config.schema import ModelConfig, RopeScalingConfig
from llmhpc.errors import InputError
from llmhpc.models.llama import Llama


def _short(tensor: MODEL_TENSOR) -> str:
    """llama.cpp's name of a tensor kind without the block prefix: 'attn_q', 'token_embd', ..."""
    return TENSOR_NAMES[tensor].removeprefix("blk.{bid}.")


# llama.cpp's tensor names (gguf-py's constants, what llama.cpp itself reads) <-> llmhpc's; shared by the
# reader here and the writer in llmhpc.export.gguf, so one is the exact inverse of the other.
_LAYER_NAMES = {
    _short(MODEL_TENSOR.ATTN_Q): "attention.wq",
    _short(MODEL_TENSOR.ATTN_K): "attention.wk",
    _short(MODEL_TENSOR.ATTN_V): "attention.wv",
    _short(MODEL_TENSOR.ATTN_OUT): "attention.wo",
    _short(MODEL_TENSOR.FFN_GATE): "feed_forward.w1",
    _short(MODEL_TENSOR.FFN_DOWN): "feed_forward.w2",
    _short(MODEL_TENSOR.FFN_UP): "feed_forward.w3",
    _short(MODEL_TENSOR.ATTN_NORM): "attention_norm",
    _short(MODEL_TENSOR.FFN_NORM): "ffn_norm",
}
_TOP_NAMES = {
    _short(MODEL_TENSOR.TOKEN_EMBD): "tok_embeddings",
    _short(MODEL_TENSOR.OUTPUT_NORM): "norm",
    _short(MODEL_TENSOR.OUTPUT): "output",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_OUR_BLOCK = re.compile(r"layers\.(\d+)\.(.+)\.weight")
ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
"""llama.cpp's per-frequency RoPE divisors [head_dim / 2] (how a GGUF file carries Llama 3 RoPE scaling)."""


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return len(field.data)  # only the length of arrays (e.g. the token list) is needed here
    return field.contents()


def config_from_gguf(reader: GGUFReader, name: str = "gguf") -> ModelConfig:
    """ModelConfig from the `llama.*` metadata (vocab size from the tokenizer's token list)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise InputError(f"GGUF architecture {arch!r} is not supported; use a 'llama' architecture GGUF file")
    dim = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = _field(reader, "llama.attention.key_length", _field(reader, "llama.rope.dimension_count"))
    vocab = _field(reader, "tokenizer.ggml.tokens") or _field(reader, "llama.vocab_size")
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none",):
        raise InputError("GGUF RoPE scaling other than none is not supported; use a GGUF file without RoPE scaling")
    tensors = {t.name: t for t in reader.tensors}
    head_dim = None if head_dim is None or int(head_dim) * n_heads == dim else int(head_dim)
    theta = _f32(_field(reader, "llama.rope.freq_base", 10000.0))
    scaling = RopeScalingConfig()
    if ROPE_FREQS in tensors:
        factors = dequantize(tensors[ROPE_FREQS].data, tensors[ROPE_FREQS].tensor_type).reshape(-1)
        scaling = rope_scaling_from_factors(factors, head_dim or dim // n_heads, theta)
    return ModelConfig(
        name=name,
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        tie_embeddings="output.weight" not in tensors,
    )


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06): the
    shortest decimal that rounds to the same float32, so a config survives a write and read unchanged."""
    return float(str(np.float32(value)))


def llama3_rope_factors(head_dim: int, theta: float, scaling: RopeScalingConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 RoPE scaling: one divisor per RoPE frequency (float32).

    llama.cpp rotates pair i by position * theta**(-2i/head_dim) / factor_i. Frequencies whose wavelength is
    shorter than original_ctx / high_freq_factor keep factor 1, longer than original_ctx / low_freq_factor get
    `factor`, and in between the blend that `llmhpc.models.llama.rope_inv_freq` applies (its inverse)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    ctx, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    smooth = (ctx / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / scaling.factor + smooth)
    factors = np.where(wavelen < ctx / high, 1.0, np.where(wavelen > ctx / low, scaling.factor, blended))
    return factors.astype(np.float32)


def rope_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> RopeScalingConfig:
    """The Llama 3 RoPE scaling whose `llama3_rope_factors` are `factors` (a GGUF file's rope_freqs).

    Only the wavelength thresholds (original_ctx / high_freq_factor, original_ctx / low_freq_factor) and
    `factor` shape the divisors, so low_freq_factor is taken as 1 (as in every Llama 3.x release) and the
    context and high_freq_factor are fitted to the blended divisors. The result is checked by recomputing the
    divisors from it; factors that no Llama 3 scaling reproduces are refused rather than approximated."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise InputError(f"rope_freqs has {factors.size} values; a head of {head_dim} needs {head_dim // 2}")
    if np.all(np.abs(factors - 1) <= 1e-6):
        return RopeScalingConfig()
    factor = float(factors.max())
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    kind = np.where(np.abs(factors - 1) <= 1e-6, 0, np.where(np.abs(factors - factor) <= 1e-6 * factor, 2, 1))
    mid = kind == 1
    refuse = InputError(
        "rope_freqs does not describe Llama 3 RoPE scaling (llama.cpp's only use of it for llama); "
        "use the Hugging Face directory of this model instead"
    )
    if np.any(np.diff(kind) < 0) or factor <= 1:  # divisors must grow with the wavelength: 1 ... blend ... factor
        raise refuse
    last_short = wavelen[kind < 2].max() if np.any(kind < 2) else 0.0
    first_long = wavelen[kind == 2].min() if np.any(kind == 2) else np.inf
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)  # the blend weight of each frequency
    if mid.sum() >= 2:  # smooth = ctx / (high - 1) / wavelen - 1 / (high - 1): a line in 1 / wavelen
        slope, intercept = np.polyfit(1 / wavelen[mid], smooth[mid], 1)
        ctx = round(-slope / intercept) if intercept < 0 else 0
        high = float(f"{1 + ctx / slope:.6g}") if slope > 0 else 0.0  # 4.0000003 (fit noise) -> 4
    else:  # one blended frequency or none: any context between the last short and first long wavelength fits
        ctx = int(np.floor(last_short)) + 1
        below = wavelen[kind == 0].max() if np.any(kind == 0) else 0.0
        high = 1 + (ctx / wavelen[mid][0] - 1) / smooth[mid][0] if mid.any() else ctx / (below + (ctx - below) / 2)
    if not (ctx >= 1 and high > 1 and ctx < first_long):
        raise refuse
    scaling = RopeScalingConfig(
        type="llama3",
        factor=_f32(factor),
        low_freq_factor=1.0,
        high_freq_factor=float(high),
        original_max_position_embeddings=int(ctx),
    )
    if not np.allclose(llama3_rope_factors(head_dim, theta, scaling), factors, rtol=1e-5, atol=0):
        raise refuse
    return scaling


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of a Q or K projection [heads*hd, in].

    llama.cpp orders each head's rows as (pair, 2) — rotation partners adjacent; HF orders them
    as (2, pair) — first halves then second halves.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row order of a Q or K projection [heads*hd, in] from HF's: the inverse of `unpermute_qk`
    (what llama.cpp's convert_hf_to_gguf.py applies to q_proj / k_proj, with the KV head count for K)."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensor_name(our_name: str) -> str:
    """llama.cpp's name of an llmhpc weight (the inverse of `_our_name`): 'layers.3.attention.wq.weight' ->
    'blk.3.attn_q.weight'."""
    m = _OUR_BLOCK.fullmatch(our_name)
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    if m and m.group(2) in layer:
        return f"blk.{m.group(1)}.{layer[m.group(2)]}.weight"
    top = {v: k for k, v in _TOP_NAMES.items()}
    base = our_name.removesuffix(".weight")
    if our_name.endswith(".weight") and base in top:
        return f"{top[base]}.weight"
    raise InputError(f"{our_name!r} is not a Llama weight; only plain Llama weights convert to GGUF")


def _our_name(gguf_name: str) -> str:
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    base = gguf_name.removesuffix(".weight")
    if gguf_name.endswith(".weight") and base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.weight"
    raise InputError(f"unexpected tensor {gguf_name!r} in a llama GGUF file; only plain Llama weights convert")


def state_dict_from_gguf(reader: GGUFReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its llmhpc name, Q/K rows in HF order."""
    state = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:  # not a weight: config_from_gguf turned it into cfg.rope_scaling
            continue
        name = _our_name(tensor.name)
        values = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions fastest-first; numpy (and torch) want them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
        if not values.flags.writeable:  # unquantized tensors are views of the read-only file map
            values = values.copy()
        weight = torch.from_numpy(values)
        if name.endswith("attention.wq.weight"):
            weight = unpermute_qk(weight, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            weight = unpermute_qk(weight, cfg.n_kv_heads)
        state[name] = weight
    return state


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Llama:
    """Llama with the dequantized weights of a llama-architecture GGUF file."""
    reader, cfg = open_gguf_config(path)
    try:
        return Llama.from_state_dict(cfg, state_dict_from_gguf(reader, cfg), dtype=dtype, device=device)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except (TypeError, ValueError, NotImplementedError) as e:  # missing metadata, an unknown quantization
        detail = " ".join(str(e).split())
        raise InputError(
            f"{path}: cannot convert this GGUF file ({type(e).__name__}: {detail}); use a llama GGUF file"
        ) from None
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        detail = " ".join(str(e).split())
        raise InputError(f"{path}: the tensors do not fit its metadata ({detail[:300]}); re-export the file") from None


# ---- parts of tensors: a sharded model dequantizes only its own rows (llmhpc.models.sharded_load) ------------


def open_gguf_config(path: str | Path) -> tuple[GGUFReader, ModelConfig]:
    """The open file (tensors memory-mapped, none read) and its ModelConfig, named as `load_gguf` names it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file fails in many ways (ValueError, struct.error, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(
            f"{path}: not a readable GGUF file, truncated or damaged ({reason}); download it again"
        ) from None
    try:
        name = _field(reader, "general.basename") or Path(path).stem
        return reader, config_from_gguf(reader, name=str(name))
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # missing or malformed metadata
        detail = " ".join(str(e).split())
        raise InputError(
            f"{path}: cannot convert this GGUF file ({type(e).__name__}: {detail}); use a llama GGUF file"
        ) from None


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies in a GGUF file and how it is encoded: plain values, so that the parsed file
    (`GGUFReader` keeps every metadata entry, ~160 MB for a 49k-token vocabulary) can be dropped before loading."""

    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    """In torch order (slowest dimension first)."""
    offset: int
    """Byte offset of its data in the file."""
    n_bytes: int


def gguf_tensor_index(path: str | Path) -> dict[str, GGUFTensorInfo]:
    """Every tensor of a llama GGUF file under its llmhpc name, located but not read."""
    return gguf_config_and_index(path)[1]


def gguf_config_and_index(path: str | Path) -> tuple[ModelConfig, dict[str, GGUFTensorInfo]]:
    """`open_gguf_config`'s config and `gguf_tensor_index`'s index from one parse of the file (a parse of a
    49k-token vocabulary takes seconds)."""
    reader, cfg = open_gguf_config(path)
    index = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:  # not a weight: open_gguf_config turned it into cfg.rope_scaling
            continue
        try:
            name = _our_name(tensor.name)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        index[name] = GGUFTensorInfo(
            GGMLQuantizationType(int(tensor.tensor_type)), shape, int(tensor.data_offset), int(tensor.n_bytes)
        )
    return cfg, index


_DEQUANTIZE_CHUNK = 16 * 2**20
"""Bytes of fp32 values `dequantize_box` dequantizes at a time."""


def dequantize_box(file_map: np.ndarray, info: GGUFTensorInfo, rows: slice, cols: slice) -> np.ndarray:
    """fp32 values [rows, cols] of a 2-D GGUF tensor (a 1-D one is the single row 0), dequantizing only them.

    `file_map` is the whole file as uint8 (`np.memmap(path, mode="r")`). A row of a tensor is a contiguous run
    of blocks of `block_size` values (`type_size` bytes each; f32 and f16 are blocks of one value), so only the
    bytes of rows `rows` are touched in the map, and of them only the blocks covering `cols`. Blocks dequantize
    independently, so the values are bitwise those `state_dict_from_gguf` gives.
    """
    block_size, type_size = GGML_QUANT_SIZES[info.qtype]
    n_rows = info.shape[0] if len(info.shape) == 2 else 1
    if len(info.shape) not in (1, 2):
        raise InputError(f"a GGUF tensor of shape {list(info.shape)}; a llama weight has 1 or 2 dimensions")
    data = file_map[info.offset : info.offset + info.n_bytes].reshape(n_rows, -1)
    first, end = cols.start // block_size, -(-cols.stop // block_size)
    skip = cols.start - first * block_size
    out = np.empty((rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)  # not a view of the file
    step = max(1, _DEQUANTIZE_CHUNK // (4 * (end - first) * block_size))  # bounds dequantize's temporaries
    for at in range(0, len(out), step):
        chunk = slice(rows.start + at, rows.start + min(at + step, len(out)))
        raw = np.ascontiguousarray(data[chunk, first * type_size : end * type_size])
        values = dequantize(raw, info.qtype).reshape(raw.shape[0], -1)
        out[at : at + raw.shape[0]] = values[:, skip : skip + out.shape[1]]
    return out


def qk_source_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The GGUF row that holds each Hugging Face-order row of a Q or K projection (what `unpermute_qk` moves).

    HF row h*hd + half*(hd/2) + pair comes from llama.cpp's row h*hd + 2*pair + half."""
    head, within = rows // head_dim, rows % head_dim
    half, pair = within // (head_dim // 2), within % (head_dim // 2)
    return head * head_dim + 2 * pair + half


def read_gguf_box(
    file_map: np.ndarray, info: GGUFTensorInfo, name: str, cfg: ModelConfig, box: tuple[slice, ...]
) -> torch.Tensor:
    """The box `box` (one slice per dimension) of the llmhpc tensor `name` (located by `info`), in fp32.

    Q and K rows are returned in HF order: the llama.cpp rows they come from are read (the span of the heads
    they touch) and reordered, so any rows of a head can be asked for."""
    from llmhpc.models.llama import head_dim_of

    if len(box) == 1:
        return torch.from_numpy(dequantize_box(file_map, info, slice(0, 1), box[0]))[0]
    rows, cols = box
    if not name.endswith(("attention.wq.weight", "attention.wk.weight")):
        return torch.from_numpy(dequantize_box(file_map, info, rows, cols))
    source = qk_source_rows(torch.arange(rows.start, rows.stop), head_dim_of(cfg))
    low, high = int(source.min()), int(source.max()) + 1
    return torch.from_numpy(dequantize_box(file_map, info, slice(low, high), cols))[source - low]
