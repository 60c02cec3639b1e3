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
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from llmhpc.config.schema import ModelConfig
from llmhpc.errors import InputError
from llmhpc.models.llama import Llama

_LAYER_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


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
    tensor_names = {t.name for t in reader.tensors}
    return ModelConfig(
        name=name,
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=None if head_dim is None or int(head_dim) * n_heads == dim else int(head_dim),
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
    )


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of a Q or K projection [heads*hd, in].

    llama.cpp orders each head's rows as (pair, 2) — rotation partners adjacent; HF orders them
    as (2, pair) — first halves then second halves.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


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
        if tensor.name == "rope_freqs.weight":
            raise InputError(
                "GGUF files with rope_freqs (llama3 RoPE scaling) are not supported; "
                "use the Hugging Face directory of this model instead"
            )
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


def load_gguf(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Llama:
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
    reader, _ = open_gguf_config(path)
    index = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            raise InputError(f"{path}: GGUF files with rope_freqs (llama3 RoPE scaling) are not supported; "
                             "use the Hugging Face directory of this model instead")
        try:
            name = _our_name(tensor.name)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        index[name] = GGUFTensorInfo(GGMLQuantizationType(int(tensor.tensor_type)), shape, int(tensor.data_offset),
                                     int(tensor.n_bytes))
    return index


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
