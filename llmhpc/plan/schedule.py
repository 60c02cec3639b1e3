"""Pipeline arithmetic: which blocks each rank holds, how many micro-batches it keeps, the bubble."""

from __future__ import annotations

from llmhpc.plan.efficiency import ZBV_BUBBLE_FRACTION
from llmhpc.plan.layout import Layout


def rank_blocks(layout: Layout, n_layers: int, split_points: list[int] | None = None) -> list[int]:
    """Blocks held by each pipeline rank: stages are cut evenly (or at `split_points`) and placed as
    llmhpc.parallel.pipeline does: rank r holds stages r, r + pp, ... (a V, r and 2pp-1-r, for zbv)."""
    n_stages = layout.pp * layout.stages_per_rank
    bounds = [0, *(split_points or [i * n_layers // n_stages for i in range(1, n_stages)]), n_layers]
    sizes = [bounds[i + 1] - bounds[i] for i in range(n_stages)]
    per_rank = [0] * layout.pp
    for stage, size in enumerate(sizes):
        if layout.pp_schedule == "zbv":
            rank = stage if stage < layout.pp else 2 * layout.pp - 1 - stage
        else:
            rank = stage % layout.pp
        per_rank[rank] += size
    return per_rank


def in_flight(layout: Layout, rank: int, micro_batches: int) -> float:
    """Micro-batches whose activations rank `rank` holds at its peak, in units of all its blocks.

    GPipe runs every forward before any backward: all m. 1F1B: pp - rank (Narayanan et al. 2021).
    Interleaved 1F1B with v stages per rank warms up (pp - rank - 1) x 2 + (v - 1) x pp stage-chunks
    (Megatron-LM's schedule), each 1/v of the rank's blocks. ZBV keeps about as many as 1F1B.
    """
    if layout.pp == 1:
        return 1.0
    m = micro_batches
    if layout.pp_schedule == "gpipe":
        return float(m)
    if layout.pp_schedule == "interleaved_1f1b":
        v = layout.stages_per_rank
        chunks = (layout.pp - rank - 1) * 2 + (v - 1) * layout.pp + 1
        return min(chunks, m * v) / v
    return float(min(m, layout.pp - rank))


def bubble_micro_batches(layout: Layout) -> float:
    """Idle time of a step in units of one micro-batch's forward + backward on a rank: (pp - 1) for GPipe and
    1F1B, (pp - 1) / v interleaved (Narayanan et al. 2021), a third of 1F1B's for ZBV."""
    if layout.pp == 1:
        return 0.0
    if layout.pp_schedule == "interleaved_1f1b":
        return (layout.pp - 1) / layout.stages_per_rank
    if layout.pp_schedule == "zbv":
        return (layout.pp - 1) * ZBV_BUBBLE_FRACTION
    return float(layout.pp - 1)
