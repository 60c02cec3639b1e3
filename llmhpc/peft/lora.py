"""LoRA, rsLoRA and DoRA adapters on the plain `Llama`, saved and loaded in Hugging Face PEFT's format.

Like a parallelism strategy, LoRA is a function applied to a finished model (`apply_lora`), not another
model class: each targeted `nn.Linear` is replaced by a `LoRALinear` that keeps the frozen base weight as
its `.weight`, so the base's checkpoint names and HF names do not change, and adds `lora_A` [r, in],
`lora_B` [out, r] (and `lora_magnitude` [out] for DoRA). Only those train; every base parameter is frozen,
so `llmhpc.train.optim` never sees the base.

The numerics are peft's (0.21), so an adapter trained here gives the same logits when `peft.PeftModel`
loads it onto the HF export of the base:

- LoRA:  y = W x + B A dropout(x) * s,  s = alpha / r (rsLoRA: alpha / sqrt(r)).
- DoRA (https://arxiv.org/abs/2402.09353): y = W x + (m / n - 1) * W x + (m / n) * B A x * s, where
  n = ||W + s B A|| per output row, treated as a constant (detached, section 4.3 of the paper) as peft does.
  With dropout active in training, peft computes that DoRA term on the dropped-out x (its `W x` included)
  while the first `W x` sees the full x; so does this module.

Our q/k projection rows are already in HF's order (`llmhpc.models.llama` uses HF's rotate-half RoPE and
`state_dict_to_hf` renames only), so lora_B of q/k is written unpermuted; the peft parity test in
tests/unit/test_lora.py (GQA, all seven projections) fails if that ever changes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llmhpc.errors import InputError
from llmhpc.models.adapters import (
    dequantize_nf4,
    fold_adapter,
    is_adapter_parameter,
    is_nf4,
    is_sharded_nf4,
    lora_scaling,
)
from llmhpc.models.hf import hf_tensor_name
from llmhpc.peft.frozen import frozen_linear

TARGETS = {
    "q": "attention.wq",
    "k": "attention.wk",
    "v": "attention.wv",
    "o": "attention.wo",
    "gate": "feed_forward.w1",
    "up": "feed_forward.w3",
    "down": "feed_forward.w2",
}
"""Our short target names -> the module path inside a `TransformerBlock`."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""peft saves a `PeftModelForCausalLM`'s tensors under this prefix + the HF module name."""


def hf_target_name(short: str) -> str:
    """peft's target_modules entry for one of our short names (`q` -> `q_proj`), taken from our HF renaming."""
    return hf_tensor_name(f"layers.0.{TARGETS[short]}.weight").split(".")[-2]


@dataclass
class LoRAConfig:
    """Low-rank adapters on the attention and MLP projections (peft's `LoraConfig` subset we support)."""

    rank: int = 8
    """r: rank of the update B A. Adapter size and capacity grow with it (8-64 is usual)."""
    alpha: float = 16.0
    """lora_alpha: the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora), so a change of
    rank need not retune the learning rate."""
    dropout: float = 0.0
    """lora_dropout: dropout on the adapter's input in training (the base path never sees it)."""
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    """Projections that get adapters: any of q, k, v, o (attention) and gate, up, down (MLP). All seven by
    default: adapting every linear layer is what QLoRA found to close the gap to full fine-tuning."""
    rslora: bool = False
    """use_rslora: scale by alpha / sqrt(rank) (rank-stabilized LoRA, https://arxiv.org/abs/2312.03732), which
    keeps the update's size stable at high ranks where alpha / rank makes it vanish."""
    dora: bool = False
    """use_dora: weight-decomposed LoRA (https://arxiv.org/abs/2402.09353): a trained magnitude per output
    feature times the direction of W + s B A. Closer to full fine-tuning at small ranks; slower per step."""
    init: str = "kaiming"
    """init_lora_weights: A ~ kaiming-uniform(a=sqrt(5)) as nn.Linear and peft do ('kaiming'), or
    A ~ N(0, 1/rank) ('gaussian'); B starts at zero either way, so a fresh adapter leaves the model unchanged."""

    def validate(self) -> None:
        """Raise ValueError naming the field for a setting peft could not load or we cannot apply."""
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora targets {unknown or '[]'} not understood; choose from {list(TARGETS)}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"lora init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        """Factor on B A x: alpha / rank, or alpha / sqrt(rank) with rsLoRA (peft's formula)."""
        return lora_scaling(self.rank, self.alpha, self.rslora)

    def same_adapter(self, other: LoRAConfig) -> bool:
        """Whether weights of one fit (and mean the same under) the other; dropout only matters in training."""
        return (self.rank, self.alpha, sorted(self.targets), self.rslora, self.dora) == (
            other.rank,
            other.alpha,
            sorted(other.targets),
            other.rslora,
            other.dora,
        )

    def to_peft(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json for peft's `LoraConfig`. Only fields that peft has read since 0.9 (DoRA) are
        written, each with its meaning spelled out, so older and newer peft releases load it alike."""
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.rank,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": [hf_target_name(t) for t in self.targets],
            "use_rslora": self.rslora,
            "use_dora": self.dora,
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft(cls, peft: dict, source: str = ADAPTER_CONFIG) -> LoRAConfig:
        """Our config of a peft adapter_config.json; any feature we would silently drop is an InputError."""
        if peft.get("peft_type") != "LORA":
            raise InputError(f"{source}: peft_type {peft.get('peft_type')!r}, only LORA adapters load here")
        unsupported = {
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "lora_bias": False,
            "use_qalora": False,
            "layer_replication": None,
            "trainable_token_indices": None,
            "target_parameters": None,
            "exclude_modules": None,
            "alora_invocation_tokens": None,
        }
        for key, plain in unsupported.items():
            value = peft.get(key)
            if value is not None and value != plain and value not in ({}, []):
                raise InputError(f"{source}: {key}={value!r} is not supported (only {key}={plain!r})")
        modules = peft.get("target_modules")
        by_hf = {hf_target_name(t): t for t in TARGETS}
        if isinstance(modules, str) or not modules or any(m not in by_hf for m in modules):
            raise InputError(f"{source}: target_modules={modules!r}; a list of {sorted(by_hf)} is supported")
        init = peft.get("init_lora_weights", True)
        if init not in (True, "gaussian"):
            raise InputError(f"{source}: init_lora_weights={init!r} is not supported (true or 'gaussian')")
        cfg = cls(
            rank=int(peft["r"]),
            alpha=float(peft.get("lora_alpha", 8)),
            dropout=float(peft.get("lora_dropout", 0.0)),
            targets=[t for t in TARGETS if hf_target_name(t) in modules],
            rslora=bool(peft.get("use_rslora", False)),
            dora=bool(peft.get("use_dora", False)),
            init="kaiming" if init is True else "gaussian",
        )
        try:
            cfg.validate()
        except ValueError as e:
            raise InputError(f"{source}: {e}") from None
        return cfg


class LoRALinear(nn.Module):
    """A frozen bias-free linear layer plus a trainable low-rank (optionally DoRA) update.

    The base weight stays `self.weight` (same name as in `nn.Linear`) so state-dict and HF names of the base
    are unchanged; the adapter adds `lora_A`, `lora_B` and, for DoRA, `lora_magnitude`. Adapter parameters are
    created on the base weight's device and dtype, so this works on the meta device (call
    `reset_lora_parameters` once the base holds its final values: DoRA's magnitude starts as their row norms).
    """

    def __init__(self, base: nn.Linear, cfg: LoRAConfig) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linears only (every Llama projection is bias-free)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.config = cfg
        self.rank, self.scaling, self.use_dora = cfg.rank, cfg.scaling, cfg.dora
        self.weight = base.weight
        self.weight.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, cfg.rank, **like))
        if cfg.dora:
            self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **like))
        else:
            self.register_parameter("lora_magnitude", None)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        """False: forward is the base alone (see `adapters_disabled`)."""
        self.reset_lora_parameters()

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} r={self.rank}"

    def dense_weight(self) -> torch.Tensor:
        """The base weight unquantized (a torchao NF4 base is dequantized; a tensor-parallel NF4 base, shard by
        shard, stays a DTensor)."""
        weight = self.weight
        if is_nf4(weight):
            return dequantize_nf4(weight)
        if is_sharded_nf4(weight):
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(dequantize_nf4(weight.to_local()), weight.device_mesh, weight.placements,
                                      shape=weight.shape, stride=weight.stride(), run_check=False)
        return weight

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A random (kaiming-uniform as peft, or gaussian), B zero, DoRA magnitude = ||W + s B A|| per row.

        Full values are drawn and each rank keeps its own part, as `Llama.init_weights` does, so an adapter
        sharded by FSDP2 before this call starts exactly as a single-process one (given the same seed).
        """
        a = torch.empty(self.lora_A.shape, device=self.lora_A.device, dtype=self.lora_A.dtype)
        if self.config.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1 / self.rank)
        _copy_own_part(self.lora_A, a)
        _copy_own_part(self.lora_B, torch.zeros(self.lora_B.shape, device=a.device, dtype=a.dtype))
        if self.lora_magnitude is not None:  # B = 0: the norm of W's rows
            _copy_own_part(self.lora_magnitude, self._weight_norm(_full(self.dense_weight()), 0.0))

    def _weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor | float) -> torch.Tensor:
        """||W + s B A|| over each output row (peft's `DoraLinearLayer.get_weight_norm`)."""
        combined = weight + self.scaling * lora_weight
        return torch.linalg.norm(combined, dim=1).to(combined.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = frozen_linear(x, self.weight)
        if not self.adapter_enabled:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.dtype)
        if self.lora_magnitude is None:
            # s applied to A x ([.., r]), not to B A x ([.., out]): one small multiply instead of a full-width one.
            update = F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scaling, self.lora_B)
            return (result + update).to(out_dtype)
        weight = self.dense_weight().to(x.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result
        else:  # peft recomputes W x on the dropped-out input for the DoRA term
            x = self.lora_dropout(x)
            base_result = F.linear(x, weight)
        lora_weight = (self.lora_B @ self.lora_A).to(x.dtype)
        weight_norm = self._weight_norm(weight, lora_weight.detach()).detach()  # a constant: DoRA section 4.3
        mag_norm_scale = (self.lora_magnitude / weight_norm).view(1, -1)
        lora_result = F.linear(F.linear(x, self.lora_A), self.lora_B)
        dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling
        return (result + dora).to(out_dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in (`fold_adapter`), in the base dtype."""
        return fold_adapter(self.dense_weight(), self.lora_A, self.lora_B, self.scaling, self.lora_magnitude)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A detached, whole tensor: a DTensor (FSDP2 / TP) is gathered first."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _copy_own_part(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `param` (a plain tensor, or a DTensor: sliced locally, no traffic)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(full)


def _is_target(name: str, suffixes: set[str]) -> bool:
    parts = name.split(".")
    return len(parts) >= 4 and parts[0] == "layers" and ".".join(parts[-2:]) in suffixes


def lora_settings(peft) -> LoRAConfig:
    """The `LoRAConfig` of a run's `peft` config section (`llmhpc.config.schema.PeftConfig`)."""
    return LoRAConfig(rank=peft.rank, alpha=peft.alpha, dropout=peft.dropout, targets=list(peft.targets),
                      rslora=peft.rslora, dora=peft.dora)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the target projections of every layer in `LoRALinear` and freeze every base parameter.

    Call it on the finished model, before any parallelism, fp8 conversion or `torch.compile` (a meta-device
    model is fine: then call `reset_lora_parameters(model)` after the base weights are initialized or loaded).
    Returns the wrapped module names (e.g. `layers.0.attention.wq`), in model order.
    """
    cfg.validate()
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; apply_lora once per model")
    for param in model.parameters():
        param.requires_grad_(False)
    suffixes = {TARGETS[t] for t in cfg.targets}
    wrapped = []
    for name, module in list(model.named_modules()):
        if not _is_target(name, suffixes):
            continue
        if type(module) is not nn.Linear:  # e.g. Float8Linear: wrapping it would silently drop its own forward
            raise ValueError(f"{name} is a {type(module).__name__}, not nn.Linear; apply LoRA before converting it")
        parent, _, child = name.rpartition(".")
        wrapper = LoRALinear(module, cfg).train(module.training)  # an eval model stays in eval (dropout off)
        setattr(model.get_submodule(parent), child, wrapper)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no projection matches lora targets {cfg.targets} in this model")
    return wrapped


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every `LoRALinear` in the model, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_config(model: nn.Module) -> LoRAConfig | None:
    """The config `apply_lora` used on this model, or None if it has no adapters."""
    modules = lora_modules(model)
    return modules[0][1].config if modules else None


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, every adapter of `model` is switched off and the model computes its frozen base: the reference
    policy of an RL run on a LoRA policy, without a second copy of the model."""
    modules = [m for _, m in lora_modules(model)]
    for module in modules:
        module.adapter_enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.adapter_enabled = True


def reset_lora_parameters(model: nn.Module) -> None:
    """Initialize every adapter (e.g. after a meta-device `apply_lora`, `to_empty` and the base's init/load)."""
    for _, module in lora_modules(model):
        module.reset_lora_parameters()


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters: the unmerged base under its usual names (for an HF export)."""
    return {k: v for k, v in model.state_dict().items() if not is_adapter_parameter(k)}


def _peft_prefix(name: str) -> str:
    """`layers.0.attention.wq` -> `base_model.model.model.layers.0.self_attn.q_proj` (peft's module key)."""
    return PEFT_PREFIX + hf_tensor_name(f"{name}.weight").removesuffix(".weight")


_PEFT_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "lora_magnitude"}
_OURS_TO_PEFT = {v: k for k, v in _PEFT_SUFFIXES.items()}


def peft_tensor_name(name: str) -> str:
    """Our adapter tensor's name -> peft's: `layers.0.attention.wq.lora_A` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; `lora_B` likewise; DoRA's `lora_magnitude` ->
    `<prefix>.lora_magnitude_vector` (no `.weight`: peft strips it so that its file format stayed the same when the
    magnitude became a module). The values need no change: our q/k rows are in HF's order (module docstring)."""
    module, kind = name.rsplit(".", 1)
    return _peft_prefix(module) + _OURS_TO_PEFT[kind]


def adapter_state_dict(model: nn.Module, peft_names: bool = True) -> dict[str, torch.Tensor]:
    """Adapter tensors only: under peft's names (`peft_tensor_name`; what `save_peft_adapter` writes), or ours
    with peft_names=False."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        for kind, param in m.named_parameters(recurse=False):
            if kind != "weight":
                out[peft_tensor_name(f"{name}.{kind}") if peft_names else f"{name}.{kind}"] = _full(param)
    return out


def save_peft_adapter(
    model: nn.Module, cfg: LoRAConfig, out_dir: str | Path, base_model_name_or_path: str | None = None,
    *, write: bool = True,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained` loads
    onto the HF export of the base (`llmhpc.models.hf.save_hf`) with the same logits. Returns the directory.

    Under FSDP2 every rank calls it (sharded adapters are gathered collectively) and only `write=True` writes."""
    used = lora_config(model)
    if used is None:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    if not cfg.same_adapter(used):
        raise ValueError(f"cfg {cfg} does not describe the model's adapters ({used})")
    tensors = adapter_state_dict(model)
    return write_peft_adapter(cfg, tensors, out_dir, base_model_name_or_path) if write else Path(out_dir)


def write_peft_adapter(
    cfg: LoRAConfig, tensors: dict[str, torch.Tensor], out_dir: str | Path, base_model_name_or_path: str | None
) -> Path:
    """Write peft's two files for adapter tensors already under peft's names (`peft_tensor_name`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to("cpu").contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg.to_peft(base_model_name_or_path), indent=2) + "\n")
    return out


def read_peft_config(directory: str | Path) -> LoRAConfig:
    """Our `LoRAConfig` of a peft adapter directory's adapter_config.json."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise InputError(f"{path}: not found; a peft LoRA adapter directory holds {ADAPTER_CONFIG}")
    try:
        peft = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); fix or re-save the adapter") from None
    if not isinstance(peft, dict):
        raise InputError(f"{path}: holds a JSON {type(peft).__name__}, not an object")
    return LoRAConfig.from_peft(peft, source=str(path))


def _read_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise InputError(f"{weights}: not found; peft saves adapter weights there (safe_serialization=True)")
    try:
        return load_file(str(weights))
    except Exception as e:  # SafetensorError (truncated, bad header) is not an OSError or ValueError
        raise InputError(f"{weights}: not a readable safetensors file ({e})") from None


def read_peft_adapter(directory: str | Path) -> tuple[LoRAConfig, dict[str, dict[str, torch.Tensor]]]:
    """(config, {our module name: {'lora_A', 'lora_B'[, 'lora_magnitude']: tensor}}) of a peft adapter directory,
    without a model: what a streaming converter needs to `fold_adapter` into each base weight it reads."""
    directory = Path(directory)
    cfg = read_peft_config(directory)
    in_layer = PEFT_PREFIX + "model.layers.0."
    ours = {_peft_prefix(f"layers.0.{TARGETS[t]}").removeprefix(in_layer): TARGETS[t] for t in cfg.targets}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_adapter_tensors(directory).items():
        suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
        parts = key.removeprefix(PEFT_PREFIX + "model.layers.").removesuffix(suffix or "").split(".", 1)
        known = key.startswith(PEFT_PREFIX) and len(parts) == 2 and parts[0].isdigit() and parts[1] in ours
        if suffix is None or not known:
            raise InputError(f"{directory / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA tensor of {cfg.targets}")
        adapters.setdefault(f"layers.{parts[0]}.{ours[parts[1]]}", {})[_PEFT_SUFFIXES[suffix]] = tensor
    wanted = {"lora_A", "lora_B"} | ({"lora_magnitude"} if cfg.dora else set())
    for name, found in adapters.items():
        if set(found) != wanted:
            raise InputError(f"{directory / ADAPTER_WEIGHTS}: {name} has {sorted(found)}, expected {sorted(wanted)}")
    return cfg, adapters


@torch.no_grad()
def load_peft_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Load a peft LoRA adapter into our model and return its config.

    A model without adapters gets `apply_lora` with the file's config first; one with adapters must have the
    same rank, alpha, targets, rsLoRA and DoRA settings. Every adapter tensor must be in the file and nothing
    else: a partial or foreign adapter is an InputError naming the file.
    """
    directory = Path(directory)
    cfg = read_peft_config(directory)
    used = lora_config(model)
    if used is None:
        apply_lora(model, cfg)
    elif not cfg.same_adapter(used):
        raise InputError(f"{directory}: the adapter ({cfg}) differs from the model's ({used})")
    weights = directory / ADAPTER_WEIGHTS
    tensors = _read_adapter_tensors(directory)
    params = {}
    for name, m in lora_modules(model):
        prefix = _peft_prefix(name)
        params[f"{prefix}.lora_A.weight"] = m.lora_A
        params[f"{prefix}.lora_B.weight"] = m.lora_B
        if m.lora_magnitude is not None:
            params[f"{prefix}.lora_magnitude_vector"] = m.lora_magnitude
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise InputError(
            f"{weights}: does not fit the model's adapters (missing {missing[:3]}, unexpected {unexpected[:3]}"
            f"{', ...' if len(missing) > 3 or len(unexpected) > 3 else ''})"
        )
    for key, param in params.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise InputError(f"{weights}: {key} is {tuple(tensors[key].shape)}, the model needs {tuple(param.shape)}")
        param.copy_(tensors[key])
    return cfg


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain `nn.Linear` back; returns the model.

    The result has exactly the base's module and parameter names again (so `save_hf`, GGUF export and the
    converter take it as any model) and computes the adapted model's logits. Merged weights stay frozen, as
    `apply_lora` left the base.
    """
    for name, m in lora_modules(model):
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta").train(m.training)
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "adapter_state_dict",
    "apply_lora",
    "base_state_dict",
    "fold_adapter",
    "is_adapter_parameter",
    "load_peft_adapter",
    "lora_config",
    "lora_modules",
    "merge_lora",
    "read_peft_adapter",
    "read_peft_config",
    "reset_lora_parameters",
    "save_peft_adapter",
]
