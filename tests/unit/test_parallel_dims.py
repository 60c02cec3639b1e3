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
        (8, {}, r"global_batch_size=8 is not a multiple of trainer\.micro_batch_size\*dp = 2\*8 = 16"),
        (1, {"ac": "some"}, r"parallel\.ac='some' is not one of: none, selective, full"),
        (1, {"cpu_offload": True}, r"cpu_offload=true needs FSDP"),
        (1, {"dp_shard": 0}, r"dp_shard must be >= 1 or -1"),
        (1, {"loss_parallel": True}, r"parallel\.loss_parallel=true needs parallel\.tp > 1 and parallel\.pp=1"),
        (2, {"engine": "ds"}, r"parallel\.engine='ds' is not one of: torch, deepspeed"),
        (2, {"engine": "deepspeed", "zero_stage": 4}, r"parallel\.zero_stage=4 is not a ZeRO stage; use 1, 2 or 3"),
        (4, {"engine": "deepspeed", "tp": 2}, r"engine=deepspeed .* parallel\.tp=2; set parallel\.tp=1"),
        (2, {"engine": "deepspeed", "ac": "full"}, r"parallel\.ac=full is not supported with parallel\.engine=deep"),
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


UNTIED = ModelConfig(n_layers=30, dim=576, n_heads=9, n_kv_heads=3, ffn_dim=1536, tie_embeddings=False)
ZBV = {"pp": 2, "pp_schedule": "zbv", "pp_split_points": [8, 15, 23]}


@pytest.mark.parametrize(
    ("world", "kw", "trainer", "message"),
    [
        (4, {"pp": 4}, {}, r"parallel\.pp=4 x 1 stage\(s\) per rank = 4 stages do not divide model\.n_layers=30; "
                           r"valid pp for this model: 1, 2, or set parallel\.pp_split_points$"),
        (2, {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 4}, {},
         r"2 x 4 stage\(s\) per rank = 8 stages do not divide model\.n_layers=30; valid pp for this model: "),
        (2, {"pp": 2, "pp_schedule": "zbv", "pp_stages_per_rank": 3}, {},
         r"pp_schedule=zbv needs exactly 2 stage\(s\) per rank, got parallel\.pp_stages_per_rank=3"),
        (2, {"pp": 2, "pp_stages_per_rank": 2}, {}, r"pp_schedule=1f1b needs 1 stage\(s\) per rank"),
        (2, {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 1}, {}, r"needs >= 2 stage\(s\)"),
        (2, {"pp": 2, "pp_split_points": [10, 20]}, {}, r"pp_split_points=\[10, 20\] must be 1 increasing block "
                                                       r"indices in 1\.\.29 .*e\.g\. \[15\]$"),
        (2, {"pp": 2, "pp_split_points": [30]}, {}, r"must be 1 increasing block indices"),
        (2, {"pp": 2}, {"global_batch_size": 4, "micro_batch_size": 4},
         r"1 micro-batches per step are fewer than parallel\.pp=2 .*global_batch_size=8$"),
        (2, ZBV, {"global_batch_size": 12, "micro_batch_size": 4},
         r"pp_schedule=zbv needs micro-batches per step \(3\) to be a multiple of parallel\.pp=2; "
         r"e\.g\. trainer\.global_batch_size=16$"),
        (4, {"pp": 2, "dp_replicate": 2, "dp_shard": 1}, {}, r"dp_replicate=2 with parallel\.pp=2 is not supported"),
        (2, {**ZBV, "compile": True}, {}, r"compile=true does not work with .*zbv"),
        (1, {"pp_split_points": [15]}, {}, r"pp_split_points=\[15\] only applies to pipeline parallelism but "
                                           r"parallel\.pp=1; set parallel\.pp > 1 or drop"),
        (1, {"pp_stages_per_rank": 2}, {}, r"pp_stages_per_rank=2 only applies to pipeline parallelism"),
    ],
)
def test_invalid_pipeline_layouts(world, kw, trainer, message):
    batch = TrainerConfig(**{"global_batch_size": 8, "micro_batch_size": 2, **trainer})
    with pytest.raises(LayoutError, match=message) as err:
        validate_layout(ParallelConfig(**kw), world, UNTIED, batch)
    assert "\n" not in str(err.value)


def test_valid_pipeline_layouts():
    seq_255 = TrainerConfig(global_batch_size=8, micro_batch_size=2, seq_len=255)
    dims = validate_layout(ParallelConfig(pp=2, tp=3), 12, UNTIED, seq_255)
    assert dims.mesh_shape() == [("pp", 2), ("dp_shard", 2), ("tp", 3)]
    assert validate_layout(ParallelConfig(pp=4, pp_split_points=[8, 16, 23]), 4, UNTIED, BATCH).pp == 4
    validate_layout(ParallelConfig(pp=3, pp_schedule="interleaved_1f1b"), 3, UNTIED,
                    TrainerConfig(global_batch_size=6, micro_batch_size=1))


def test_stage_split_and_placement():
    from llmhpc.parallel.pipeline import local_stage_ids, stage_layer_ranges

    assert stage_layer_ranges(8, 4, []) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layer_ranges(5, 2, [1]) == [range(0, 1), range(1, 5)]
    assert local_stage_ids(1, 4, 2, "interleaved_1f1b") == [1, 5]
    assert local_stage_ids(0, 4, 2, "zbv") == [0, 7]  # the V: rank 0 holds the first and the last stage
    assert local_stage_ids(3, 4, 1, "1f1b") == [3]


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
