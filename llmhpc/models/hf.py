"""Hugging Face Llama interop: config.json <-> ModelConfig, state-dict names, safetensors files.

Conversion refuses anything it cannot represent exactly (biases, other RoPE types, other
architectures) instead of silently producing wrong weights. Only safetensors are read unless the
caller opts in to pickle files, which are then loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmhpc.config.schema import ModelConfig, RopeScalingConfig
from llmhpc.models.llama import Llama, head_dim_of

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
PICKLE_WEIGHTS = ("pytorch_model.bin", "model.pt", "model.pth")
"""Pickle-based weight files recognized in an HF directory (read only with allow_pickle=True)."""


def _rope_from_hf(hf: dict) -> tuple[float, RopeScalingConfig]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    if not params:
        params = dict(legacy)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return float(theta), RopeScalingConfig(type="none")
    if rope_type != "llama3":
        raise ValueError(f"RoPE type {rope_type!r} is not supported (only default and llama3)")
    defaults = RopeScalingConfig()
    scaling = RopeScalingConfig(
        type="llama3",
        factor=float(params.get("factor", defaults.factor)),
        low_freq_factor=float(params.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(params.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
        ),
    )
    return float(theta), scaling


def config_from_hf(hf: dict, name: str = "hf") -> ModelConfig:
    """ModelConfig of a Hugging Face Llama config.json (transformers 4 or 5 RoPE keys)."""
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model_type {model_type!r} is not supported; only Llama models convert")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{flag}=true is not supported by the llmhpc Llama (it has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    theta, scaling = _rope_from_hf(hf)
    return ModelConfig(
        name=name,
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=None if head_dim is None or int(head_dim) * n_heads == dim else int(head_dim),
        ffn_dim=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers' LlamaForCausalLM (RoPE in both the 4.x and 5.x spellings)."""
    rope_parameters: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling.type == "llama3":
        rs = cfg.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": head_dim_of(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _rename(name: str, layer_re: re.Pattern, layer_map: dict, top_map: dict, layer_prefix: str) -> str:
    m = layer_re.fullmatch(name)
    if m and m.group(2) in layer_map:
        return f"{layer_prefix}.{m.group(1)}.{layer_map[m.group(2)]}.weight"
    base = name.removesuffix(".weight")
    if name.endswith(".weight") and base in top_map:
        return f"{top_map[base]}.weight"
    raise KeyError(name)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor names -> llmhpc names; with tied embeddings an lm_head copy is dropped."""
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        try:
            out[_rename(name, _HF_LAYER, _LAYER_NAMES, _TOP_NAMES, "layers")] = tensor
        except KeyError:
            raise ValueError(f"unexpected tensor {name!r} in a Hugging Face Llama state dict") from None
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llmhpc tensor names -> HF names (tied models have no lm_head.weight, as HF saves them)."""
    layer_map = {v: k for k, v in _LAYER_NAMES.items()}
    top_map = {v: k for k, v in _TOP_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        try:
            out[_rename(name, _OUR_LAYER, layer_map, top_map, "model.layers")] = tensor
        except KeyError:
            raise ValueError(f"unexpected tensor {name!r} in an llmhpc Llama state dict") from None
    return out


def save_hf(model: Llama, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write model.safetensors + config.json (+ tokenizer files) that transformers loads as-is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.tok_embeddings.weight.dtype
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict_to_hf(tensors), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = config_to_hf(model.cfg, dtype)
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                config[key] = getattr(tokenizer, key)
        tokenizer.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor] | None:
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    return None


def read_pickle_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors of a pickle file, only when the caller opted in; never runs code from it."""
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickle file, which can run code when loaded; convert it to safetensors "
            "or pass allow_pickle=True (loads with torch.load(weights_only=True))"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf_weights(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """HF-named tensors of a directory: safetensors, or a pickle file only when allowed."""
    state = _read_safetensors(directory)
    if state is not None:
        return state
    for name in PICKLE_WEIGHTS:
        path = directory / name
        if path.is_file():
            return read_pickle_weights(path, allow_pickle)
    raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {directory}")


def load_hf(
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
) -> Llama:
    """Llama from a Hugging Face directory (config.json + safetensors)."""
    directory = Path(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    cfg = config_from_hf(hf_config, name=directory.name or "hf")
    state = state_dict_from_hf(read_hf_weights(directory, allow_pickle), cfg)
    return Llama.from_state_dict(cfg, state, dtype=dtype, device=device)
