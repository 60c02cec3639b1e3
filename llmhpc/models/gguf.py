"""Read a llama.cpp GGUF file into an llmhpc Llama: metadata -> config, tensors dequantized to fp32.

llama.cpp stores the query/key projection rows interleaved for its own RoPE layout; they are put
back into Hugging Face's rotate-half order here so the model needs no special case. transformers'
GGUF loader is the reference this is tested against.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from llmhpc.config.schema import ModelConfig
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
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' converts")
    dim = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = _field(reader, "llama.attention.key_length", _field(reader, "llama.rope.dimension_count"))
    vocab = _field(reader, "tokenizer.ggml.tokens") or _field(reader, "llama.vocab_size")
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none",):
        raise ValueError("GGUF RoPE scaling other than none is not supported")
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
    raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


def state_dict_from_gguf(reader: GGUFReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its llmhpc name, Q/K rows in HF order."""
    state = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            raise ValueError("GGUF files with rope_freqs (llama3 RoPE scaling) are not supported")
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
    reader = GGUFReader(str(path))
    name = _field(reader, "general.basename") or Path(path).stem
    cfg = config_from_gguf(reader, name=str(name))
    return Llama.from_state_dict(cfg, state_dict_from_gguf(reader, cfg), dtype=dtype, device=device)
