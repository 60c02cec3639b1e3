"""Arithmetic of the planner's memory and time models, and the `llmhpc plan` command."""

from __future__ import annotations

import dataclasses

import pytest

from llmhpc.cli import main
from llmhpc.config import load_config
from llmhpc.config.schema import ClusterConfig
from llmhpc.plan import STACKS, Cluster, Layout, ModelShape, Workload, estimate_memory, estimate_step
from llmhpc.plan.schedule import bubble_micro_batches, in_flight, rank_blocks


def workload(model: str = "llama3_8b", seq: int = 8192, gbs: int = 64, precision: str = "bf16") -> Workload:
    shape = ModelShape.of(load_config("plan", [f"model={model}"], check_layout=False).model)
    return Workload(shape, seq, gbs, precision)


def test_shape_counts_match_the_real_model():
    import torch

    from llmhpc.models import build_model

    cfg = load_config("plan", ["model=llama3_8b"], check_layout=False).model
    with torch.device("meta"):
        model = build_model(cfg, device="meta")
    shape = ModelShape.of(cfg)
    assert shape.total_params == model.num_params()
    assert shape.model_flops_per_token(8192) == model.flops_per_token(8192)


def test_fsdp_divides_model_state_by_dp_shard():
    w = workload(precision="fp32")  # in fp32 FSDP changes no dtype: the activations stay those of one process
    one, eight = estimate_memory(w, Layout(micro_batch=1)), estimate_memory(w, Layout(dp_shard=8, micro_batch=1))
    for key in ("params", "grads", "optimizer"):
        assert getattr(eight, key) == pytest.approx(getattr(one, key) / 8)
    assert eight.activations == pytest.approx(one.activations)


def test_fsdp_mixed_precision_gathers_bf16_and_keeps_fp32_master_state():
    """Under bf16 FSDP2 gathers bf16 parameters and reduce-scatters fp32 gradients (llmhpc.parallel.fsdp); the
    sharded weights, gradients and AdamW state stay fp32. Other layouts keep the fp32 residual stream."""
    from llmhpc.plan.throughput import param_gather_bytes

    w32, w16 = workload(precision="fp32"), workload(precision="bf16")
    fsdp = Layout(dp_shard=8, micro_batch=1)
    m32, m16 = estimate_memory(w32, fsdp), estimate_memory(w16, fsdp)
    for key in ("params", "grads", "optimizer"):
        assert getattr(m16, key) == getattr(m32, key)
    # Gathered weights and unsharded gradients halve; FSDP2's reduce-scatter input (one block) stays fp32.
    assert m16.gathered == pytest.approx(m32.gathered / 2 + 2 * w16.shape.block_params)
    # The residual stream is bf16 inside FSDP's units, fp32 under autocast alone (one process, DDP).
    assert m16.activations < 0.9 * estimate_memory(w16, Layout(micro_batch=1)).activations
    assert estimate_memory(w16, Layout(dp_replicate=8, micro_batch=1)).activations == pytest.approx(
        estimate_memory(w16, Layout(micro_batch=1)).activations)
    # Communication: bf16 all-gathers (fp32 in fp32) for llmhpc; the reduce-scatter stays fp32.
    assert (param_gather_bytes(w16, STACKS["llmhpc"]), param_gather_bytes(w32, STACKS["llmhpc"])) == (2, 4)
    assert STACKS["llmhpc"].grad_reduce_bytes == 4
    slow = Cluster.of(ClusterConfig(nodes=4, inter_node_gbs=1.0))  # communication-bound: the gathers show
    wide = Layout(dp_shard=32, micro_batch=1)
    t32, t16 = (estimate_step(w, wide, slow, STACKS["llmhpc"]) for w in (w32, w16))
    # 2 micro-batches (64 sequences / 32 ranks), each gathering every block twice over a 1 GB/s ring at 80 %:
    # bf16 saves 2 bytes per parameter and gather. (What shows is the traffic beyond each micro-batch's compute.)
    saved = 2 * 2 * 2 * w32.shape.n_layers * w32.shape.block_params * 31 / 32 / (slow.inter_bw * 0.8)
    assert (t32.dp_comm + t32.compute) - (t16.dp_comm + t16.compute) == pytest.approx(saved, rel=1e-6)


def test_zero_stages_shard_progressively():
    w = workload()
    z = {s: estimate_memory(w, Layout(dp_shard=8, engine="deepspeed", zero_stage=s)) for s in (1, 2, 3)}
    assert z[1].optimizer == z[2].optimizer == z[3].optimizer
    assert z[1].grads > z[2].grads == z[3].grads
    assert z[2].params > z[3].params


def test_activation_checkpointing_shrinks_activations():
    w = workload()
    acts = [estimate_memory(w, Layout(dp_shard=8, recompute=r)).activations for r in (0.0, 0.5, 1.0)]
    assert acts[0] > acts[1] > acts[2]
    assert acts[2] < acts[0] / 5


def test_tensor_parallel_shrinks_activations_and_state():
    w = workload()
    one, four = estimate_memory(w, Layout(dp_shard=2)), estimate_memory(w, Layout(dp_shard=2, tp=4))
    assert four.params == pytest.approx(one.params / 4, rel=0.01)
    assert four.activations < one.activations / 2


def test_loss_parallel_shards_the_logits_over_tp():
    w = workload()
    full = estimate_memory(w, Layout(dp_shard=2, tp=4))
    sharded = estimate_memory(w, Layout(dp_shard=2, tp=4, loss_parallel=True))
    assert sharded.logits == pytest.approx(full.logits / 4)
    assert sharded.activations == pytest.approx(full.activations)


def test_pipeline_in_flight_micro_batches_per_schedule():
    gpipe, ofob = Layout(pp=4, pp_schedule="gpipe"), Layout(pp=4, pp_schedule="1f1b")
    assert in_flight(gpipe, 0, 16) == 16
    assert [in_flight(ofob, r, 16) for r in range(4)] == [4, 3, 2, 1]
    inter = Layout(pp=4, pp_schedule="interleaved_1f1b", stages_per_rank=2)
    assert in_flight(inter, 0, 16) == pytest.approx((3 * 2 + 4 + 1) / 2)  # Megatron's warm-up
    w = workload(model="llama3_70b", gbs=32)
    assert estimate_memory(w, gpipe).activations > 3 * estimate_memory(w, ofob).activations


def test_stage_placement_and_bubble():
    assert rank_blocks(Layout(pp=4), 32) == [8, 8, 8, 8]
    assert rank_blocks(Layout(pp=2, pp_schedule="zbv", stages_per_rank=2), 8) == [4, 4]
    assert rank_blocks(Layout(pp=2), 4, [1]) == [1, 3]
    assert bubble_micro_batches(Layout(pp=8)) == 7
    assert bubble_micro_batches(Layout(pp=8, pp_schedule="interleaved_1f1b", stages_per_rank=4)) == 7 / 4


def test_throughput_responds_to_layout():
    w, cluster, stack = workload(gbs=128), Cluster.of(ClusterConfig(nodes=1)), STACKS["llmhpc"]
    base = estimate_step(w, Layout(dp_shard=8), cluster, stack)
    assert estimate_step(w, Layout(dp_shard=8, recompute=1.0), cluster, stack).compute > base.compute * 1.2
    assert estimate_step(w, Layout(dp_shard=8), cluster, stack).tokens_per_s_per_gpu < estimate_step(
        dataclasses.replace(w, precision="fp8"), Layout(dp_shard=8), cluster, stack).tokens_per_s_per_gpu
    slow_net = Cluster.of(ClusterConfig(nodes=4, inter_node_gbs=1.0))
    assert estimate_step(w, Layout(dp_shard=32), slow_net, stack).dp_comm > 0
    piped = estimate_step(w, Layout(dp_shard=2, pp=4), cluster, stack)
    assert piped.bubble > 0 and piped.pp_comm > 0


def test_search_turns_loss_parallel_on_where_it_applies_unless_fixed():
    from llmhpc.plan.efficiency import stack
    from llmhpc.plan.search import search

    overrides = ["model=llama3_8b", "cluster.nodes=1", "trainer.seq_len=4096", "trainer.global_batch_size=16"]
    cfg = load_config("plan", overrides, check_layout=False)
    found = search(cfg, Cluster.of(cfg.cluster), stack("llmhpc"), set())
    assert {c.layout.loss_parallel for c in found if c.layout.tp > 1 and c.layout.pp == 1} == {True}
    assert not any(c.layout.loss_parallel for c in found if c.layout.tp == 1 or c.layout.pp > 1)
    fixed = search(cfg, Cluster.of(cfg.cluster), stack("llmhpc"), {"parallel.loss_parallel"})
    assert not any(c.layout.loss_parallel for c in fixed)


def test_plan_cli_single_layout(capsys):
    rc = main(["plan", "model=llama3_8b", "trainer.seq_len=8192", "trainer.global_batch_size=64",
               "trainer.micro_batch_size=1", "precision=bf16", "parallel.dp_shard=8", "parallel.ac=full"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "memory per GPU" in out and "tokens/s/GPU" in out and "fits" in out


def test_plan_cli_search_ranks_layouts(capsys):
    rc = main(["plan", "model=llama3_8b", "cluster.nodes=2", "trainer.seq_len=4096", "trainer.global_batch_size=64",
               "precision=bf16", "plan.top=3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert " 1  " in out and " 3  " in out and "fastest layout that fits" in out


@pytest.mark.parametrize("args, message", [
    (["parallel.tp=3"], "does not divide"),
    (["parallel.dp_shard=3"], "world size is 8"),
    (["cluster.gpu=h900"], "not a GPU preset"),
    (["plan.stack=deepspeed"], "plan.stack"),
])
def test_plan_cli_bad_input_is_one_line_exit_2(capsys, args, message):
    rc = main(["plan", "model=llama3_8b", "trainer.seq_len=4096", "trainer.global_batch_size=64",
               "trainer.micro_batch_size=1", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1
