"""Parallelism as functions applied to a finished plain model, never as a different model class.

`parallelize` applies them in the one order that composes: tensor/sequence parallel → activation
checkpointing → torch.compile → data parallel (FSDP2, DDP, or HSDP). Heavy imports happen inside
the functions so that config validation (which imports `dims`) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmhpc.parallel.dims import LayoutError, ParallelDims, dp_mesh, dp_rank, dp_size, validate_layout

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh

    from llmhpc.config.schema import ParallelConfig


def parallelize(
    model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelConfig, *, precision: str = "fp32"
) -> list[nn.Module]:
    """Apply the layout `dims` (over `mesh`, None for one process) to `model` in place.

    `precision` is the run's `precision.name`: under 'bf16' and 'fp8' FSDP2 gathers parameters in bf16 and
    reduces gradients in fp32 (`llmhpc.parallel.fsdp.mixed_precision_policy`); other layouts ignore it.

    Returns the modules that run forward: `[model]`, or under pipeline parallel this rank's stages
    (`llmhpc.parallel.pipeline.StageModule`), whose blocks `model` keeps under their global names for
    the optimizer and checkpoints.
    """
    from llmhpc.parallel.activation_ckpt import apply_ac

    parts = [model]
    if dims.pp > 1:
        from llmhpc.parallel.pipeline import split_model

        assert mesh is not None
        parts = split_model(model, mesh["pp"].get_local_rank(), cfg)
    if dims.tp > 1:
        from llmhpc.parallel.tensor import apply_tensor_parallel

        # The run's device: the mesh's (the model itself may still be on the meta device).
        device_type = mesh.device_type if mesh is not None else next(model.parameters()).device.type
        if cfg.compile and device_type == "cpu":
            raise LayoutError(
                "parallel.compile=true does not work with parallel.tp > 1 on CPU (torch.compile cannot trace the "
                "tensor-parallel DTensor model there); set parallel.compile=false or run on GPUs"
            )
        assert mesh is not None
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True, loss_parallel=cfg.loss_parallel)
    apply_ac(model, cfg.ac)
    if cfg.compile:
        if dims.dp_size > 1 or dims.pp > 1:  # per block: FSDP's hooks and stage boundaries stay outside the graphs
            for block in model.layers.values():
                block.compile()
        else:
            model.compile()
    if dims.fsdp:
        from llmhpc.parallel.fsdp import apply_fsdp

        assert mesh is not None
        names = ("dp_replicate", "dp_shard") if dims.hsdp else ("dp_shard",)
        for part in parts:
            apply_fsdp(part, mesh[names], cfg, precision)
    elif dims.ddp:
        from llmhpc.parallel.ddp import apply_ddp

        assert mesh is not None
        for part in parts:
            apply_ddp(part, mesh["dp_replicate"])
    return parts


__all__ = ["LayoutError", "ParallelDims", "dp_mesh", "dp_rank", "dp_size", "parallelize", "validate_layout"]
