"""Data-parallel views of a run's DeviceMesh; the layout rules themselves live in `llmhpc.config.layout`.

Re-exports the layout names so that parallelism code has one place to import them from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmhpc.config.layout import (
    DEFAULT_STAGES_PER_RANK,
    LayoutError,
    ParallelDims,
    resolve_dims,
    stages_per_rank,
    valid_tp_sizes,
    validate_layout,
    validate_tp,
    world_size_from_env,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def dp_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The data-parallel sub-mesh ('dp', or its only dp dimension), or None without data parallelism."""
    if mesh is None or mesh.mesh_dim_names is None:
        return None
    names = mesh.mesh_dim_names
    dp_names = [n for n in names if n in ("dp_replicate", "dp_shard")]
    if len(dp_names) > 1:
        return mesh["dp"]
    return mesh[dp_names[0]] if dp_names else None


def dp_rank(mesh: DeviceMesh | None) -> int:
    """This process's index among the data-parallel ranks (0 without data parallelism)."""
    sub = dp_mesh(mesh)
    return 0 if sub is None else sub.get_local_rank()


def dp_size(mesh: DeviceMesh | None) -> int:
    """Number of data-parallel ranks (1 without data parallelism)."""
    sub = dp_mesh(mesh)
    return 1 if sub is None else sub.size()


__all__ = [
    "DEFAULT_STAGES_PER_RANK", "LayoutError", "ParallelDims", "dp_mesh", "dp_rank", "dp_size", "resolve_dims",
    "stages_per_rank", "valid_tp_sizes", "validate_layout", "validate_tp", "world_size_from_env",
]
