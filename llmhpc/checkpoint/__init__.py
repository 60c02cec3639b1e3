"""Distributed checkpoints: atomic save, keep-last-k, exact resume, lineage."""

from llmhpc.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    complete_checkpoints,
    latest_checkpoint,
    load_model_state,
    read_checkpoint_config,
    read_meta,
)

__all__ = [
    "CheckpointError", "CheckpointManager", "complete_checkpoints", "latest_checkpoint", "load_model_state",
    "read_checkpoint_config", "read_meta",
]
