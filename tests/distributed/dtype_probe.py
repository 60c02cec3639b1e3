"""`python tests/distributed/dtype_probe.py ARGS` (also under torchrun): run `llmhpc ARGS` and record dtypes.

Two process-wide hooks watch the real run without touching llmhpc's code:

- a global module forward pre-hook records, for every `nn.Linear` and `RMSNorm` that runs with gradients on
  (training, not eval), the dtype and tensor type of the weight it computes with (inside an FSDP2 unit: the
  all-gathered parameter) and the dtype of its input;
- a global optimizer step post-hook records the dtype of every parameter the optimizer updates, of its
  gradient and of its state (AdamW moments), and whether the parameters are DTensor shards;
- wrappers around `torch.distributed.all_gather_single` / `reduce_scatter_single` (what FSDP2's default
  collectives call) record the dtype of what goes over the wire.

Per rank, the sets of what was seen go to $DTYPE_PROBE_DIR/rank<RANK>.json.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from llmhpc.cli import main
from llmhpc.models.llama import RMSNorm

SEEN: dict[str, set[str]] = defaultdict(set)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _forward_pre_hook(module: nn.Module, args: tuple) -> None:
    if not torch.is_grad_enabled() or not isinstance(module, (nn.Linear, RMSNorm)):
        return
    kind = "linear" if isinstance(module, nn.Linear) else "norm"
    SEEN[f"{kind}_weight"].add(_dtype(module.weight))
    SEEN[f"{kind}_weight_type"].add(type(module.weight.data).__name__)
    if args and isinstance(args[0], torch.Tensor):
        SEEN[f"{kind}_input"].add(_dtype(args[0]))


def _optimizer_post_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            SEEN["param"].add(_dtype(p))
            SEEN["param_type"].add(type(p.data).__name__)
            if isinstance(p, DTensor):
                SEEN["local_shard_smaller"].add(str(p.to_local().numel() < p.numel()))
            if p.grad is not None:
                SEEN["grad"].add(_dtype(p.grad))
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.numel() > 1:  # moments, not the step counter
                    SEEN["optimizer_state"].add(_dtype(value))


def _recording(name: str, collective):
    def wrapper(*args, **kwargs):
        tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
        SEEN[name].add(_dtype(tensor))
        return collective(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    import torch.distributed as dist

    dist.all_gather_single = _recording("all_gather", dist.all_gather_single)
    dist.reduce_scatter_single = _recording("reduce_scatter", dist.reduce_scatter_single)
    nn.modules.module.register_module_forward_pre_hook(_forward_pre_hook)
    register_optimizer_step_post_hook(_optimizer_post_hook)
    rc = main(sys.argv[1:])
    out = Path(os.environ["DTYPE_PROBE_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps({k: sorted(v) for k, v in SEEN.items()}, indent=1))
    sys.exit(rc)
