"""Hugging Face Llama interop: config.json <-> ModelConfig, state-dict names, safetensors files.

Conversion refuses anything it cannot represent exactly (biases, other RoPE types, other
architectures) instead of silently producing wrong weights. Only safetensors are read unless the
caller opts in to pickle files, which are then loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmhpc.config.schema import ModelConfig, RopeScalingConfig
from llmhpc.errors import InputError
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
        raise InputError(f"RoPE type {rope_type!r} is not supported; use a Llama model with default or llama3 RoPE")
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
        raise InputError(f"model_type {model_type!r} is not supported; use a Llama model (model_type 'llama')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise InputError(f"{flag}=true is not supported (the llmhpc Llama has no biases); use a model without")
    if hf.get("hidden_act", "silu") != "silu":
        raise InputError(f"hidden_act {hf['hidden_act']!r} is not supported; use a Llama model with hidden_act 'silu'")
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
            raise InputError(f"unexpected tensor {name!r} in the weights; only Llama weights convert") from None
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


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_WRITE_CHUNK = 2**22
"""Elements converted and written at a time."""


def hf_shard_plan(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_bytes: int | None = None
) -> list[list[str]]:
    """The tensors of each safetensors file, in order: at most `max_shard_bytes` each (one bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...]]], tensors: Iterable[torch.Tensor], dtype: torch.dtype
) -> None:
    """One safetensors file, streamed: the header comes from `entries` (name, shape), then each tensor of
    `tensors` (in entry order, converted to `dtype`) is written as it arrives, so one tensor is in memory."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        written = 0
        for (name, shape), tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the header says {tuple(shape)}")
            written += _write_tensor(f, tensor, dtype)
            del tensor  # before the next one is read
        if written != offset:
            raise AssertionError(f"{path}: wrote {written} tensor bytes, the header says {offset}")
        f.flush()
        os.fsync(f.fileno())


def _write_tensor(f, tensor: torch.Tensor, dtype: torch.dtype) -> int:
    """Append `tensor`'s values as `dtype` to a file; a dtype cast copies a chunk at a time, not the tensor."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _WRITE_CHUNK):
        f.write(flat[start : start + _WRITE_CHUNK].to("cpu", dtype).contiguous().view(torch.uint8).numpy().data)
    return flat.numel() * dtype.itemsize


def write_hf_weights(
    out: Path,
    shapes: dict[str, tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    max_shard_bytes: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> list[str]:
    """Write the weights `shapes` names (llmhpc names, in order) under HF names, reading each with `read` only
    when it is written: `model.safetensors`, or above `max_shard_bytes` `model-0000N-of-0000M.safetensors` +
    `model.safetensors.index.json`. Returns the weight files written (older ones of another split are removed)."""
    out = Path(out)
    plan = hf_shard_plan(shapes, dtype, max_shard_bytes)
    files = (
        [SINGLE_FILE]
        if len(plan) == 1
        else [f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)]
    )

    def stream(names: list[str]) -> Iterator[torch.Tensor]:
        for name in names:
            yield read(name)
            if on_tensor is not None:
                on_tensor(name)

    weight_map: dict[str, str] = {}
    for file, names in zip(files, plan, strict=True):
        entries = [(hf_tensor_name(name), tuple(shapes[name])) for name in names]
        write_safetensors(out / file, entries, stream(names), dtype)
        weight_map.update(dict.fromkeys((hf_name for hf_name, _ in entries), file))
    if len(files) > 1:
        total = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        files.append(INDEX_FILE)
    for stale in out.iterdir():  # weights of an earlier save with another split would confuse loaders
        if stale.name not in files and (stale.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(stale.name)):
            stale.unlink()
    return files


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos / eos / pad token ids a tokenizer defines (for config.json and generation_config.json)."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None) if tokenizer is not None else None
        if value is not None:
            ids[key] = int(value)
    return ids


def save_hf_tokenizer(tokenizer, out: Path) -> None:
    """Tokenizer files with the chat template inside tokenizer_config.json, as transformers 4 and 5, vLLM, SGLang
    and llama.cpp's converter all read it (transformers 5 would put it in chat_template.jinja only)."""
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    config_file = Path(out) / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; 4.x knows the alias
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_config(out: Path, cfg: ModelConfig, dtype: torch.dtype, tokenizer=None) -> None:
    """config.json, generation_config.json (bos / eos / pad ids of the tokenizer) and the tokenizer files."""
    ids = special_token_ids(tokenizer)
    (Path(out) / "config.json").write_text(json.dumps({**config_to_hf(cfg, dtype), **ids}, indent=2) + "\n")
    (Path(out) / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, Path(out))


def save_hf(
    model: Llama,
    out_dir: str | Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write model.safetensors (or shards above `max_shard_bytes`) + config.json + generation_config.json
    (+ tokenizer files) that transformers loads as-is. `dtype` defaults to the model's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.tok_embeddings.weight.dtype
    state = model.state_dict()
    write_hf_weights(
        out, {name: tuple(t.shape) for name, t in state.items()}, state.__getitem__, dtype, max_shard_bytes
    )
    write_hf_config(out, model.cfg, dtype, tokenizer)
    return out


def _load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file; a damaged file is an InputError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the model.safetensors.index.json lists it, so copy it there")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (truncated, bad header) is not an OSError or ValueError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: not a readable safetensors file ({reason}); re-download or re-export it") from None


def _read_json(path: Path):
    """Parsed JSON of a file the user supplied; bad bytes or bad JSON are an InputError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: byte {e.start} is not valid UTF-8 ({e.reason}); convert the file to UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix or re-download the file"
        ) from None


def read_hf_config(config_file: Path, name: str = "hf") -> ModelConfig:
    """ModelConfig of a config.json file; any problem with it is an InputError that names the file."""
    hf = _read_json(config_file)
    try:
        if not isinstance(hf, dict):
            raise InputError("it holds a JSON " + type(hf).__name__ + ", not an object")
        return config_from_hf(hf, name=name)
    except InputError as e:
        raise InputError(f"{config_file}: {e}") from None
    except KeyError as e:
        raise InputError(f"{config_file}: no {e} key; a Llama config.json is needed") from None
    except (TypeError, ValueError) as e:
        raise InputError(f"{config_file}: a value has the wrong type ({e}); a Llama config.json is needed") from None


def _index_weight_map(index: Path) -> dict[str, str]:
    """{tensor name: shard file name} of a sharded checkpoint's model.safetensors.index.json."""
    index_json = _read_json(index)
    weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: no 'weight_map' object; fix or re-download the file")
    return weight_map


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor] | None:
    single = directory / "model.safetensors"
    if single.is_file():
        return _load_safetensors_file(single)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _index_weight_map(index)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_safetensors_file(directory / shard))
        return state
    return None


def read_pickle_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors of a pickle file, only when the caller opted in; never runs code from it."""
    if not allow_pickle:
        raise InputError(
            f"{path}: a pickle file, which can run code when loaded, so it is refused; convert it to "
            "model.safetensors, or from Python pass allow_pickle=True (loads with torch.load(weights_only=True))"
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
    raise FileNotFoundError(
        f"{directory}: no model.safetensors (or model.safetensors.index.json); put the weights there as safetensors"
    )


def load_hf(
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
) -> Llama:
    """Llama from a Hugging Face directory (config.json + safetensors)."""
    directory = Path(directory)
    cfg = read_hf_config(directory / "config.json", name=directory.name or "hf")
    return model_from_hf_state(directory, cfg, read_hf_weights(directory, allow_pickle), dtype=dtype, device=device)


def model_from_hf_state(
    source: Path, cfg: ModelConfig, hf_state: dict[str, torch.Tensor], *, dtype: torch.dtype, device
) -> Llama:
    """Llama with HF-named weights read from `source`; weights that do not fit cfg are an InputError naming it."""
    try:
        return Llama.from_state_dict(cfg, state_dict_from_hf(hf_state, cfg), dtype=dtype, device=device)
    except InputError as e:
        raise InputError(f"{source}: {e}") from None
    except RuntimeError as e:
        if "state_dict" not in str(e):  # not load_state_dict's report of missing / unexpected / misshapen tensors
            raise
        detail = " ".join(str(e).split())
        raise InputError(
            f"{source}: the weights do not fit its config.json ({detail[:300]}); use the config.json of these weights"
        ) from None


# ---- tensor by tensor: a sharded model reads only its own parts (llmhpc.models.sharded_load) ----------------


def hf_tensor_name(name: str) -> str:
    """The Hugging Face name of the llmhpc tensor `name` (the renaming `state_dict_to_hf` does)."""
    layer_map = {v: k for k, v in _LAYER_NAMES.items()}
    top_map = {v: k for k, v in _TOP_NAMES.items()}
    try:
        return _rename(name, _OUR_LAYER, layer_map, top_map, "model.layers")
    except KeyError:
        raise ValueError(f"unexpected tensor {name!r} in an llmhpc Llama state dict") from None


def safetensors_weight_map(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (model.safetensors, or the shards of
    model.safetensors.index.json), reading only headers. A directory with pickle weights only is refused as
    `read_hf_weights` refuses it without allow_pickle."""
    from safetensors import safe_open

    single = directory / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except Exception as e:  # SafetensorError (truncated, bad header) is not an OSError or ValueError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(
                f"{single}: not a readable safetensors file ({reason}); re-download or re-export it"
            ) from None
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {name: directory / shard for name, shard in _index_weight_map(index).items()}
    read_hf_weights(directory, allow_pickle=False)  # no safetensors: raises (pickle refused, or no weights at all)
    raise AssertionError(f"{directory}: read_hf_weights found no weights and did not raise")
