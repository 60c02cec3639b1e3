"""Peak memory per GPU of an llmhpc training run, by category.

The model follows what this code base keeps alive, tensor by tensor (see docs/planner.md):
fp32 master weights, fp32 gradients and AdamW moments, sharded by FSDP2 / ZeRO; FSDP's gathered
blocks and root (bf16 under precision=bf16/fp8: FSDP2's mixed-precision policy); the activations
autograd saves in our eager block (the residual stream is fp32 under plain bf16 autocast, bf16 inside
FSDP2's mixed precision; RMSNorm normalizes in fp32 either way) for every micro-batch a pipeline
schedule holds; the fused LM-head loss's chunk of logits. The worst pipeline rank is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from llmhpc.plan.layout import Layout
from llmhpc.plan.schedule import in_flight, rank_blocks
from llmhpc.plan.workload import Workload

GIB = 2**30
ADAM_BYTES = 8
"""AdamW keeps two fp32 moments per parameter."""
MASTER_BYTES = 4
"""Sharded weights and gradients are fp32 in every precision (bf16/fp8 change the matmul inputs and, under FSDP2,
the gathered copies)."""
REDUCE_BYTES = 4
"""FSDP2 reduces gradients in fp32 in every precision (`MixedPrecisionPolicy(reduce_dtype=torch.float32)`)."""
LOSS_CHUNK_TOKENS = 1024
"""Tokens per chunk of the fused LM-head loss (llmhpc.train.losses.CHUNK_TOKENS)."""
FSDP_BLOCKS_IN_FLIGHT = 2
"""Gathered blocks FSDP2 holds at once: the one computing and the one prefetched."""
RUNTIME_BYTES = 1.5 * GIB
"""CUDA context, cuBLAS workspaces and NCCL buffers per GPU (typically 1-2 GiB on H100); not counted on CPU."""
FRAGMENTATION = 0.10
"""Allocator allowance on top of the live tensors: freed blocks the allocator keeps but cannot reuse for the
next request (PyTorch's CUDA caching allocator; glibc malloc on CPU, measured at 12-19 % there: docs/planner.md)."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU at the peak of a step, on the pipeline rank with the largest total."""

    params: float
    """fp32 weights this rank stores (after sharding)."""
    grads: float
    """fp32 gradients this rank stores."""
    optimizer: float
    """AdamW moments this rank stores."""
    gathered: float
    """Unsharded copies: FSDP's gathered root and in-flight blocks with their unsharded gradients, or DDP buckets."""
    activations: float
    """Saved activations of every micro-batch in flight, plus one recomputed block under checkpointing."""
    logits: float
    """Loss working set: the fused loss's logits chunk and head-gradient accumulator, or full logits under TP."""
    buffers: float
    """Fragmentation allowance, plus the CUDA runtime reserve on GPUs."""
    rank: int = 0
    """The pipeline rank this breakdown is for."""

    @property
    def model_state(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def live(self) -> float:
        """The tensors alone, without the allocator's and the runtime's share."""
        return self.model_state + self.gathered + self.activations + self.logits

    @property
    def total(self) -> float:
        return self.live + self.buffers

    def gib(self) -> dict[str, float]:
        """Every category and the total in GiB, for reports."""
        out = {f.name: getattr(self, f.name) / GIB for f in fields(self) if f.name != "rank"}
        out["total"] = self.total / GIB
        return out


def fsdp_mixed_precision(w: Workload, layout: Layout) -> bool:
    """Whether FSDP2's mixed-precision policy applies (`llmhpc.parallel.fsdp.mixed_precision_policy`): bf16 or fp8
    under FSDP (torch engine, dp_shard > 1). Then parameters are gathered, and blocks run, in bf16."""
    return w.precision != "fp32" and layout.engine == "torch" and layout.dp_shard > 1


def residual_bytes(w: Workload, layout: Layout) -> int:
    """Bytes per element of the residual stream between blocks: bf16 inside FSDP2's mixed precision (it casts
    each block's input to bf16), else fp32 (fp32 weights; autocast only lowers the matmuls)."""
    return 2 if fsdp_mixed_precision(w, layout) else 4


def gathered_param_bytes(w: Workload, layout: Layout) -> int:
    """Bytes per element of the parameters (and unsharded gradients) FSDP2 gathers: bf16 under its mixed-precision
    policy, else fp32 (also for DeepSpeed ZeRO-3, modelled like FSDP without a policy)."""
    return 2 if fsdp_mixed_precision(w, layout) else MASTER_BYTES


def block_activation_bytes(w: Workload, tp: int, mixed: bool = False) -> float:
    """Bytes autograd saves per token for one transformer block of llmhpc's model; `mixed` under FSDP2's
    mixed-precision policy (`fsdp_mixed_precision`).

    Saved tensors: per RMSNorm (two per block, sequence-sharded under TP) its fp32 input and its normalized x,
    4 + 4 bytes per element with an fp32 residual stream; inside FSDP's mixed precision the fp32 copy of the bf16
    input and the bf16 normalized x (4 + 2). The inputs of the q/k/v and w1/w3 projections (all-gathered, so full
    size under TP): 2 h fp32; 5 h bf16 under autocast alone, which casts the fp32 norm output once per linear;
    2 h bf16 under mixed precision (the norm output is bf16 already and shared). q, k, v, the attention output and
    its reshaped copy (3 q + 2 kv); SwiGLU's w1 and w3 outputs, silu and the product (4 f); the attention
    log-sum-exp (one fp32 per head). Head-sharded tensors divide by tp. (Checked against the tensors autograd
    saves on CPU, `torch.autograd.graph.saved_tensors_hooks`, in fp32, bf16 autocast and FSDP2 mixed precision.)
    """
    s = w.shape
    low = w.low_bytes
    if w.precision == "fp32":
        norms, linear_inputs = 2 * (4 + 4) * s.dim, 2 * s.dim * 4
    elif mixed:
        norms, linear_inputs = 2 * (4 + 2) * s.dim, 2 * s.dim * 2
    else:
        norms, linear_inputs = 2 * (4 + 4) * s.dim, 5 * s.dim * 2
    sharded = (3 * s.q_dim + 2 * s.kv_dim + 4 * s.ffn_dim) * low + 4 * s.n_heads
    return norms / tp + linear_inputs + sharded / tp


def logits_bytes(w: Workload, layout: Layout) -> float:
    """Loss working set on the last stage, at its peak (the cross entropy's backward).

    With a plain head matrix (no TP: one process, FSDP2 — whose root keeps the head gathered after forward —,
    the last pipeline stage, DeepSpeed) llmhpc's fused loss keeps one chunk of logits in the compute dtype
    (overwritten in place by their gradient), an fp32 accumulator for the head's gradient (under bf16 also the
    bf16 product and its fp32 copy that are added to it) and the hidden states' gradient (in the residual dtype).
    Under TP (a sharded head) the logits are materialized, and the eager loss peaks in log-softmax's backward with
    three fp32 logits-sized tensors alive: the saved log-softmax, the gradient coming from the NLL and the one going
    out; the logits and their fp32 copy are freed once the loss is formed (both measured with torch.profiler on
    CPU, docs/planner.md). With loss parallel each TP rank holds only its vocabulary shard of all of them. A
    pipeline's last stage hands the objective its hidden states, not logits, so the schedule holds nothing
    vocabulary-sized between forward and backward.
    """
    s = w.shape
    tokens = layout.micro_batch * w.seq_len
    if layout.tp == 1:
        chunk = min(LOSS_CHUNK_TOKENS, tokens)
        # bf16: the accumulator, the chunk's bf16 product and (after the first chunk) that product's fp32 copy
        head_grad = s.vocab * s.dim * (4 if w.precision == "fp32" else 4 + 2 + (4 if tokens > chunk else 0))
        return chunk * s.vocab * w.low_bytes + head_grad + tokens * s.dim * residual_bytes(w, layout)
    shards = layout.tp if layout.loss_parallel else 1
    return tokens * s.vocab * 3 * 4 / shards


def last_stage_rank(layout: Layout) -> int:
    """The rank holding the output head: the last one, or rank 0 for ZBV (its V ends where it started)."""
    return 0 if layout.pp_schedule == "zbv" and layout.pp > 1 else layout.pp - 1


def estimate_memory(w: Workload, layout: Layout, micro_batches: int | None = None, on_gpu: bool = True
                    ) -> MemoryBreakdown:
    """Peak bytes per GPU of `layout`; `micro_batches` per step per data-parallel rank defaults to the
    workload's (global batch / (micro batch x dp)). `on_gpu=False` (a CPU run) leaves out the CUDA runtime reserve."""
    m = micro_batches or max(1, w.global_batch // (layout.micro_batch * layout.dp))
    blocks = rank_blocks(layout, w.shape.n_layers, list(w.split_points) or None)
    best: MemoryBreakdown | None = None
    for rank, n_blocks in enumerate(blocks):
        candidate = _rank_memory(w, layout, rank, n_blocks, m, on_gpu)
        if best is None or candidate.total > best.total:
            best = candidate
    assert best is not None
    return best


def _rank_memory(w: Workload, layout: Layout, rank: int, n_blocks: int, m: int, on_gpu: bool) -> MemoryBreakdown:
    s = w.shape
    first, last = rank == 0, rank == last_stage_rank(layout)
    root = (s.embedding_params if first else 0) + (s.head_params + s.dim if last else 0)
    local = (n_blocks * s.block_params + root) / layout.tp
    block = s.block_params / layout.tp

    shard_p = shard_g = shard_o = 1
    if layout.engine == "deepspeed":
        shard_o = layout.dp
        shard_g = layout.dp if layout.zero_stage >= 2 else 1
        shard_p = layout.dp if layout.zero_stage >= 3 else 1
    else:
        shard_p = shard_g = shard_o = layout.dp_shard
    params = local * MASTER_BYTES / shard_p
    grads = local * MASTER_BYTES / shard_g
    optimizer = local * ADAM_BYTES / shard_o

    gathered = 0.0
    sharded_weights = shard_p > 1
    if sharded_weights:
        # Gathered weights and unsharded gradients in the parameter dtype (bf16 under FSDP2 mixed precision); the
        # block linears' weights in float8 under fp8 (torchao's float8 all-gather, tensorwise). The root (embedding,
        # norm, head) stays gathered all step with its gradient; per block in flight its weights, and in backward
        # one block's unsharded gradients plus FSDP2's reduce-scatter input they are copied into (fp32).
        param_b = gathered_param_bytes(w, layout)
        block_b = 1 if w.precision == "fp8" and fsdp_mixed_precision(w, layout) else param_b
        root_local = root / layout.tp
        kept = n_blocks if not layout.reshard_after_forward else min(n_blocks, FSDP_BLOCKS_IN_FLIGHT)
        block_grads = (param_b + REDUCE_BYTES) * block if n_blocks else 0.0
        gathered = 2 * param_b * root_local + block_b * block * kept + block_grads
    elif layout.dp_replicate > 1 and layout.dp_shard == 1 and layout.engine == "torch":
        gathered = local * MASTER_BYTES  # DDP's bucket copies of the gradients

    tokens = layout.micro_batch * w.seq_len
    stream = residual_bytes(w, layout)
    per_block = block_activation_bytes(w, layout.tp, fsdp_mixed_precision(w, layout)) * tokens
    kept_input = stream * s.dim * tokens / layout.tp  # a checkpointed block keeps only its input
    recomputed = round(n_blocks * layout.recompute)
    one_mb = (n_blocks - recomputed) * per_block + recomputed * kept_input
    activations = in_flight(layout, rank, m) * one_mb + (per_block if recomputed else 0.0)
    if last:
        activations += (4 + stream) * s.dim * tokens  # final RMSNorm's saved fp32 input and normalized x
    logits = logits_bytes(w, layout) if last else 0.0

    live = params + grads + optimizer + gathered + activations + logits
    buffers = live * FRAGMENTATION + (RUNTIME_BYTES if on_gpu else 0.0)
    return MemoryBreakdown(params, grads, optimizer, gathered, activations, logits, buffers, rank)
