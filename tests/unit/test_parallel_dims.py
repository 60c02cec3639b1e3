"""Layout rules: the degrees multiply to the world size; every invalid layout names its rule and a fix."""

from __future__ import annotations

import pytest

from llmhpc.config import ConfigError, load_config
from llmhpc.config.schema import ModelConfig, ParallelConfig, TrainerConfig
from llmhpc.parallel.activation_ckpt import blocks_to_checkpoint
from llmhpc.parallel.dims import LayoutError, validate_layout

SMOL = ModelConfig(n_layers=30, dim=576, n_heads=9, n_kv_heads=3)
BATCH = TrainerConfig(global_batch_size=8, micro_batch_size=2)


def layout(world: int, **kw) -> object:
    return validate_layout(ParallelConfig(**kw), world, SMOL, BATCH)


def test_dp_shard_fills_the_world():
    dims = layout(4)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp_size, dims.fsdp, dims.hsdp) == (1, 4, 4, True, False)
    dims = layout(4, dp_replicate=2)
    assert (dims.dp_shard, dims.hsdp) == (2, True)
    assert layout(2, dp_replicate=2, dp_shard=1).ddp
    assert [name for name, _ in layout(4, dp_replicate=2).mesh_shape()] == ["dp_replicate", "dp_shard"]
    assert layout(1).mesh_shape() == []


@pytest.mark.parametrize(
    ("world", "kw", "message"),
    [
        (1, {"dp_shard": 3}, r"= 3 but the world size is 1 .*e\.g\. parallel\.dp_shard=1"),
        (4, {"dp_replicate": 3}, r"dp_replicate\*tp\*pp = 3 does not divide the world size 4"),
        (2, {"tp": 2}, r"parallel\.tp=2 does not divide model\.n_heads=9; valid tp for this model: 1"),
        (3, {"tp": 3}, r"parallel\.tp=3 does not divide model\.ffn_dim=704; valid tp for this model: 1$"),
        (4, {"pp": 4}, r"parallel\.pp=4 does not divide model\.n_layers=30; valid pp for this model: 1, 2"),
        (2, {"pp": 2}, r"pipeline parallel lands in a later change"),
        (8, {}, r"global_batch_size=8 is not a multiple of trainer\.micro_batch_size\*dp = 2\*8 = 16"),
        (1, {"ac": "some"}, r"parallel\.ac='some' is not one of: none, selective, full"),
        (1, {"cpu_offload": True}, r"cpu_offload=true needs FSDP"),
        (1, {"dp_shard": 0}, r"dp_shard must be >= 1 or -1"),
    ],
)
def test_invalid_layouts_fail_with_one_line(world, kw, message):
    with pytest.raises(LayoutError, match=message) as err:
        layout(world, **kw)
    assert "\n" not in str(err.value)


SMALL = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=192)


def test_tp_is_accepted_when_it_divides_the_model():
    dims = validate_layout(ParallelConfig(tp=2), 4, SMALL, BATCH)
    assert (dims.tp, dims.dp_shard, dims.dp_size) == (2, 2, 2)
    assert dims.mesh_shape() == [("dp_shard", 2), ("tp", 2)]
    assert validate_layout(ParallelConfig(tp=2, dp_shard=1), 2, SMALL, BATCH).mesh_shape() == [("tp", 2)]
    with pytest.raises(LayoutError, match=r"parallel\.tp=8 does not divide model\.n_heads=4; "
                                          r"valid tp for this model: 1, 2$"):
        validate_layout(ParallelConfig(tp=8, dp_shard=1), 8, SMALL, BATCH)
    with pytest.raises(LayoutError, match=r"dp_replicate=2 with parallel\.tp=2 is not yet supported.*dp_shard=2$"):
        validate_layout(ParallelConfig(tp=2, dp_replicate=2, dp_shard=1), 4, SMALL, BATCH)


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    trainer = TrainerConfig(global_batch_size=8, micro_batch_size=2, seq_len=63)
    with pytest.raises(LayoutError, match=r"trainer\.seq_len=63 is not a multiple of parallel\.tp=2.*seq_len=62"):
        validate_layout(ParallelConfig(tp=2, dp_shard=1), 2, SMALL, trainer)


def test_compile_with_tp_is_refused_on_cpu():
    from llmhpc.models import build_model
    from llmhpc.parallel import parallelize

    dims = validate_layout(ParallelConfig(tp=2, dp_shard=1), 2, SMALL, BATCH)
    with pytest.raises(ConfigError, match=r"compile=true does not work with parallel\.tp > 1 on CPU"):
        parallelize(build_model(SMALL), dims, None, ParallelConfig(tp=2, dp_shard=1, compile=True))


def test_pp_needs_enough_micro_batches():
    model = ModelConfig(n_layers=4)
    with pytest.raises(LayoutError, match=r"1 micro-batches per step are fewer than parallel\.pp=2"):
        validate_layout(ParallelConfig(pp=2), 2, model, TrainerConfig(global_batch_size=4, micro_batch_size=4))


def test_load_config_checks_the_layout_against_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"world size is 1"):
        load_config("pretrain", ["parallel.dp_shard=3"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config("pretrain", ["parallel.dp_shard=2", "trainer.micro_batch_size=4"])
    assert cfg.parallel.dp_shard == 2


def test_selective_ac_checkpoints_every_other_block():
    assert blocks_to_checkpoint(5, "selective") == [0, 2, 4]
    assert blocks_to_checkpoint(3, "full") == [0, 1, 2]
    assert blocks_to_checkpoint(3, "none") == []
