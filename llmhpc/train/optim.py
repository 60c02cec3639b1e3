"""AdamW with the usual LLM parameter grouping, plus configured groups with their own lr scale and decay.

Weight decay is applied to matrices (linear and embedding weights) and not to norm gains or biases, as in
every Llama-family recipe. Frozen parameters (requires_grad=False) are left out: the optimizer never sees
them and keeps no state for them. The fused kernel is used where PyTorch has one for the device (CUDA, and
CPU since 2.4), since it is the fastest correct implementation.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from llmhpc.config.schema import ParamGroupConfig, TrainerConfig
from llmhpc.config.validate import ConfigError
from llmhpc.parallel.pipeline import checkpoint_name


def parameter_groups(
    model: nn.Module, weight_decay: float, configured: list[ParamGroupConfig] | tuple = ()
) -> tuple[list[dict], list[float]]:
    """(AdamW param groups, their lr scales) over the trainable parameters, in a fixed order.

    Each configured group (first match wins), then the rest, is split into decayed (ndim >= 2) and not
    decayed (norms, biases) parameters unless the group sets its own weight decay; empty groups are dropped.
    """
    buckets: list[tuple[list[nn.Parameter], float, float]] = []  # (params, weight decay, lr scale)
    index: dict[tuple[int, bool], int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = checkpoint_name(model, name)  # a pipeline's tied head copy is configured as the embedding
        which = next((i for i, g in enumerate(configured) if any(fnmatch(name, p) for p in g.params)), -1)
        group = configured[which] if which >= 0 else None
        matrix = param.ndim >= 2
        if group is not None and group.weight_decay is not None:
            decay, key = group.weight_decay, (which, True)
        else:
            decay, key = (weight_decay if matrix else 0.0), (which, matrix)
        if key not in index:
            index[key] = len(buckets)
            buckets.append(([], decay, group.lr_scale if group is not None else 1.0))
        buckets[index[key]][0].append(param)
    for i, group in enumerate(configured):
        if not any(k[0] == i for k in index):
            raise ConfigError(f"trainer.param_groups[{i}] params={list(group.params)} match no trainable parameter")
    ordered = sorted(index.items(), key=lambda item: (item[0][0] < 0, item[0][0], not item[0][1]))
    groups = [{"params": buckets[i][0], "weight_decay": buckets[i][1]} for _, i in ordered]
    return groups, [buckets[i][2] for _, i in ordered]


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> tuple[torch.optim.AdamW, list[float]]:
    """AdamW over the model's trainable parameters and each param group's lr scale (the schedule sets lr)."""
    groups, scales = parameter_groups(model, cfg.weight_decay, list(cfg.param_groups))
    if not groups:
        raise ConfigError("the model has no trainable parameters (check trainer.freeze)")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    return optimizer, scales
