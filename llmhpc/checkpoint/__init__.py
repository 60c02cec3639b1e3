"""Distributed checkpoints: atomic save, keep-last-k, exact resume, lineage."""

from llmhpc.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    Component,
    complete_checkpoints,
    latest_checkpoint,
    load_model_state,
    primary_component,
    read_checkpoint_config,
    read_meta,
)

__all__ = [
    "CheckpointError", "CheckpointManager", "Component", "complete_checkpoints", "latest_checkpoint",
    "load_model_state", "primary_component", "read_checkpoint_config", "read_meta",
]
