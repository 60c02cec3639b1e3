"""`llmhpc pretrain` shards the model on the meta device and each rank initializes only its shards.

The weights must still be exactly those of a one-process run (the loss-equality tests of every layout rely on
it), so each layout below builds, parallelizes and initializes the model the way `_train` does, on real gloo
processes, and compares every weight it holds (gathered from its shards) bitwise with the one-process model.
The fp8 layout covers the GPU path (`precision=fp8` is refused at launch on CPU, so the functions are called
directly): FSDP2's float8-cast weight subclasses inside TP DTensors must be materialized and filled too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.distributed.launch import spawn_gloo

OVERRIDES = ["model=tiny", "model.tie_embeddings=false", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
             "run.device=cpu"]
LAYOUTS = {
    "dp_shard=2 x tp=2": ["parallel.dp_shard=2", "parallel.tp=2"],
    "dp_shard=2 x pp=2 (interleaved, FSDP per stage)": [
        "parallel.dp_shard=2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_split_points=[2,3,5]"],
    # the GPU fp8 path: float8 linears whose FSDP2 weights are float8-cast tensor subclasses, inside TP DTensors
    "fp8 tensorwise, dp_shard=2 x tp=2": ["parallel.dp_shard=2", "parallel.tp=2", "precision=fp8", "model.dim=64",
                                          "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=128"],
}


def _check_layout(world: int, extra: list[str]) -> dict[str, object]:
    from torch.distributed.tensor import DTensor

    from llmhpc.config import load_config
    from llmhpc.parallel import parallelize
    from llmhpc.parallel.dims import validate_layout
    from llmhpc.parallel.float8 import apply_float8
    from llmhpc.train.builder import build_model_for, initialize_sharded

    cfg = load_config("pretrain", [*OVERRIDES, *extra])  # pretrain's order below; fp8's device check is skipped
    reference_model = build_model_for(cfg, torch.device("cpu"))[0]
    reference = reference_model.state_dict()
    dims = validate_layout(cfg.parallel, world, cfg.model, cfg.trainer)
    model = build_model_for(cfg, torch.device("meta"))[0]
    after_step = None
    if cfg.precision.name == "fp8":
        after_step = apply_float8(model, cfg.precision.fp8_recipe, fsdp=dims.fsdp, tp=dims.tp)
    parts = parallelize(model, dims, dims.build_mesh("cpu"), cfg.parallel)
    initialize_sharded(model, parts, cfg, torch.device("cpu"))
    if after_step is not None:
        after_step()  # the float8 scales of the weights, as the Trainer computes them before step 1
    held, mismatched, local_bytes, float8_weights = 0, [], 0, 0
    for fqn, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        local = param.to_local() if isinstance(param, DTensor) else param
        local_bytes += local.numel() * local.element_size()
        float8_weights += type(local).__name__ == "WeightWithDynamicFloat8CastTensor"
        held += 1
        if not torch.equal(full, reference[fqn]):
            mismatched.append(fqn)
    rope_ok = all(torch.equal(part.rope_cos, reference_model.rope_cos) and torch.equal(
        part.rope_sin, reference_model.rope_sin) for part in parts)
    return {"held": held, "mismatched": mismatched, "rope_ok": rope_ok, "local_bytes": local_bytes,
            "float8_weights": float8_weights, "fp8": cfg.precision.name == "fp8",
            "model_bytes": sum(t.numel() * t.element_size() for t in reference.values())}


def scenarios(world: int) -> dict[str, Callable[[], object]]:
    return {name: lambda e=extra: _check_layout(world, e) for name, extra in LAYOUTS.items()}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    return spawn_gloo(4, scenarios, tmp_path_factory.mktemp("sharded_init"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_init_gives_the_one_process_weights(reports, layout):
    for rank, report in enumerate(reports):
        result = report[layout]
        assert "error" not in result, result["error"]
        assert result["held"] > 0 and result["mismatched"] == [], (rank, result["mismatched"])
        assert result["rope_ok"], rank
        assert (result["float8_weights"] > 0) == result["fp8"], (rank, result)
        # Each rank materialized only its shards: well under the whole model (4 ranks, 2-way sharded at least).
        assert result["local_bytes"] <= 0.6 * result["model_bytes"], (rank, result)
