"""Join (and leave) the default process group of a multi-process launch.

torchrun and `srun torchrun` export RANK, WORLD_SIZE, MASTER_ADDR/PORT and LOCAL_RANK; the
env:// rendezvous reads them, so nothing here assumes one node. LOCAL_RANK picks the GPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device: torch.device, world_size: int, timeout_s: float = 1800) -> torch.device:
    """Init the process group when world_size > 1 (NCCL on CUDA, gloo on CPU); returns this rank's device.
    `timeout_s` bounds the wait for every rank to join and every collective after (run.collective_timeout_s)."""
    if world_size <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def destroy_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes logs, metrics and checkpoint metadata."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()
