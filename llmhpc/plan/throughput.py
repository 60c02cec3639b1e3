"""Step time, tokens/s/GPU and MFU of a layout, from FLOPs, bytes and bandwidths.

Per micro-batch, on the busiest pipeline rank: matmul time at a fraction of the dense peak (FP8
for the block linears under precision=fp8), FlashAttention time, elementwise (HBM-bound) time,
all divided by the stack's one calibrated factor; then the communication that is not hidden:
tensor-parallel collectives (in the critical path, unless the stack overlaps them), FSDP
all-gathers and reduce-scatters (prefetched, so only the part longer than compute shows),
pipeline sends. A step is (micro-batches + bubble) micro-batch times, plus once-per-step gradient
reduction (when the stack accumulates before reducing) and the optimizer's pass over its state.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmhpc.plan.cluster import Cluster
from llmhpc.plan.efficiency import (
    ATTENTION_BACKWARD_FACTOR,
    ATTENTION_FRACTION,
    HBM_FRACTION,
    LINK_FRACTION,
    MATMUL_BF16_FRACTION,
    MATMUL_FP8_FRACTION,
    Stack,
)
from llmhpc.plan.layout import Layout
from llmhpc.plan.memory import last_stage_rank
from llmhpc.plan.schedule import bubble_micro_batches, rank_blocks
from llmhpc.plan.workload import Workload

OPTIMIZER_BYTES_PER_PARAM = 28
"""Fused AdamW reads weight, gradient and two moments (16 bytes) and writes weight and moments (12 bytes)."""


def ew_accesses(w: Workload) -> float:
    """Elements read + written per token by the elementwise kernels of one eager block's forward: two RMSNorms
    (~7 h each: cast, square, mean, rsqrt-multiply, weight), two residual adds (3 h each), RoPE on q and k
    (~9 passes over q + kv), the attention output's transpose copy (2 q), SwiGLU (5 f)."""
    s = w.shape
    return 20 * s.dim + 11 * s.q_dim + 9 * s.kv_dim + 5 * s.ffn_dim


@dataclass(frozen=True)
class StepEstimate:
    """Where the time of one optimizer step goes, in seconds (per-step totals on the busiest rank)."""

    compute: float
    """Matmuls, attention and elementwise kernels, recomputation included."""
    tp_comm: float
    """Exposed tensor-parallel all-gathers / reduce-scatters."""
    dp_comm: float
    """Exposed data-parallel traffic (FSDP gathers and gradient reductions)."""
    pp_comm: float
    """Pipeline sends and receives."""
    bubble: float
    """Pipeline idle time."""
    optimizer: float
    """The optimizer step."""
    tokens_per_step: int
    """Tokens in one global batch."""
    world_size: int
    """GPUs."""
    model_flops_per_token: float
    """Model FLOPs per token (the MFU convention of `Llama.flops_per_token`)."""
    peak_flops: float
    """Dense BF16 peak MFU is measured against (also for FP8 runs, as torchtitan does)."""

    @property
    def step_time(self) -> float:
        return self.compute + self.tp_comm + self.dp_comm + self.pp_comm + self.bubble + self.optimizer

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_time / self.world_size

    @property
    def mfu(self) -> float:
        return self.tokens_per_s_per_gpu * self.model_flops_per_token / self.peak_flops


def param_gather_bytes(w: Workload, stack: Stack) -> float:
    """Bytes per parameter of a data-parallel weight all-gather in high precision: the stack's figure, or (None,
    llmhpc) the parameter dtype of FSDP2's mixed-precision policy: bf16 under precision=bf16 / fp8, else fp32."""
    return w.low_bytes if stack.param_gather_bytes is None else stack.param_gather_bytes


def _ring(bytes_total: float, n: int, bw: float) -> float:
    """Seconds for a ring all-gather or reduce-scatter whose full (unsharded) result is `bytes_total`."""
    return 0.0 if n <= 1 else bytes_total * (n - 1) / n / (bw * LINK_FRACTION)


def estimate_step(w: Workload, layout: Layout, cluster: Cluster, stack: Stack) -> StepEstimate:
    """Estimate one optimizer step of `w` laid out as `layout` on `cluster` with `stack`'s efficiencies."""
    s, gpu = w.shape, cluster.gpu
    m = max(1, w.global_batch // (layout.micro_batch * layout.dp))
    tokens = layout.micro_batch * w.seq_len
    blocks = rank_blocks(layout, s.n_layers, list(w.split_points) or None)
    head_rank = last_stage_rank(layout)
    mb_times = [_micro_batch(w, layout, cluster, stack, n, r == head_rank, tokens) for r, n in enumerate(blocks)]
    compute, tp, dp_overlapped, pp = max(mb_times, key=lambda t: sum(t))
    # FSDP's prefetch hides its traffic behind the micro-batch's compute; only the excess shows.
    dp_exposed = max(0.0, dp_overlapped - compute)

    local = (max(blocks) * s.block_params + s.embedding_params + s.head_params) / layout.tp
    if layout.pp > 1:
        local = (max(blocks) * s.block_params + s.embedding_params) / layout.tp
    dp_once = _reduce_once(w, layout, cluster, stack, local, compute)
    shard = layout.dp_shard if layout.engine == "torch" else layout.dp
    optimizer = local / shard * OPTIMIZER_BYTES_PER_PARAM / (gpu.hbm_bw * HBM_FRACTION)
    bubble = bubble_micro_batches(layout) * (compute + tp + pp)
    return StepEstimate(
        compute=m * compute, tp_comm=m * tp, dp_comm=m * dp_exposed + dp_once, pp_comm=m * pp, bubble=bubble,
        optimizer=optimizer, tokens_per_step=w.tokens_per_step, world_size=layout.world_size,
        model_flops_per_token=s.model_flops_per_token(w.seq_len), peak_flops=gpu.bf16_flops,
    )


def _micro_batch(w: Workload, layout: Layout, cluster: Cluster, stack: Stack, n_blocks: int, has_head: bool,
                 tokens: int) -> tuple[float, float, float, float]:
    """(compute, exposed TP comm, overlappable DP comm, PP comm) seconds of one micro-batch on one rank."""
    s, gpu, tp = w.shape, cluster.gpu, layout.tp
    r = layout.recompute
    passes = 3 + r  # forward, backward = 2 forwards, recomputed forward
    block_mm = 2 * s.block_matmul_params / tp * tokens * n_blocks * passes
    head_mm = 6 * s.vocab * s.dim / tp * tokens if has_head else 0.0
    bf16_rate = gpu.bf16_flops * MATMUL_BF16_FRACTION
    if w.precision == "fp32":
        bf16_rate /= 2  # TF32 tensor cores
    if w.precision == "fp8" and gpu.fp8_flops:
        t_mm = block_mm / (gpu.fp8_flops * MATMUL_FP8_FRACTION) + head_mm / bf16_rate
    else:
        t_mm = (block_mm + head_mm) / bf16_rate
    attn_fwd = 2 * tokens * w.seq_len * s.q_dim / tp * n_blocks  # causal: half of 4 s^2 q_dim
    t_attn = attn_fwd * (1 + ATTENTION_BACKWARD_FACTOR + r) / (gpu.bf16_flops * ATTENTION_FRACTION)
    traffic = stack.compiled_traffic if layout.compile else stack.elementwise_traffic
    elem_bytes = 4 if w.precision == "fp32" else 3  # llmhpc autocast: fp32 residual path, bf16 elsewhere
    ew = ew_accesses(w) * elem_bytes * traffic
    if w.precision == "fp8":  # dynamic scaling: amax + cast of each linear's inputs and output gradients
        ew += 5 * (2 * s.dim + s.q_dim + s.ffn_dim) * 2 * traffic
    t_ew = ew * tokens * n_blocks * passes / tp / (gpu.hbm_bw * HBM_FRACTION)
    compute = (t_mm + t_attn + t_ew) / stack.calibration

    act = w.low_bytes
    tp_bw = cluster.group_bw(tp, 1)
    # Sequence parallel: 2 all-gathers + 2 reduce-scatters of the [tokens, dim] activations per block and pass.
    tp_comm = 4 * _ring(tokens * s.dim * act, tp, tp_bw) * n_blocks * passes * stack.tp_exposed

    dp_comm = 0.0
    sharded = layout.dp_shard > 1 and (layout.engine == "torch" or layout.zero_stage == 3)
    if sharded:
        local = (n_blocks * s.block_params) / tp
        gather_bytes = 1 if w.precision == "fp8" else param_gather_bytes(w, stack)  # fp8: float8 all-gather
        gathers = 2 if layout.reshard_after_forward else 1
        bw = cluster.group_bw(layout.dp_shard, tp)
        dp_comm = gathers * _ring(local * gather_bytes, layout.dp_shard, bw)
        if not stack.grad_reduce_once:
            dp_comm += _ring(local * stack.grad_reduce_bytes, layout.dp_shard, bw)
            if layout.dp_replicate > 1:  # HSDP: all-reduce the shards across replicas
                rep_bw = cluster.group_bw(layout.dp_replicate, tp * layout.dp_shard)
                dp_comm += 2 * _ring(local / layout.dp_shard * stack.grad_reduce_bytes, layout.dp_replicate, rep_bw)
    elif layout.dp_replicate > 1 and not stack.grad_reduce_once and layout.engine == "torch":
        local = (n_blocks * s.block_params) / tp
        bw = cluster.group_bw(layout.dp_replicate, tp)
        dp_comm = 2 * _ring(local * stack.grad_reduce_bytes, layout.dp_replicate, bw)  # DDP all-reduce

    pp_comm = 0.0
    if layout.pp > 1:
        pp_bw = cluster.group_bw(layout.pp, layout.dp * tp)
        hops = layout.stages_per_rank
        pp_comm = 2 * hops * tokens * s.dim * act / tp / (pp_bw * LINK_FRACTION)
    return compute, tp_comm, dp_comm, pp_comm


def _reduce_once(w: Workload, layout: Layout, cluster: Cluster, stack: Stack, local_params: float,
                 mb_compute: float) -> float:
    """Exposed once-per-step gradient reduction (+ weight gather) of stacks that accumulate before reducing and of
    ZeRO-1/2; overlapped with the last micro-batch's backward (2/3 of its compute)."""
    once = stack.grad_reduce_once or (layout.engine == "deepspeed" and layout.zero_stage < 3)
    if layout.dp == 1 or not once:
        return 0.0
    bw = cluster.group_bw(layout.dp, layout.tp)
    traffic = _ring(local_params * stack.grad_reduce_bytes, layout.dp, bw) + _ring(
        local_params * param_gather_bytes(w, stack), layout.dp, bw)
    return max(0.0, traffic - 2 / 3 * mb_compute)
