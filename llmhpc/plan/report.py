"""The printed answer of `llmhpc plan`: one layout in detail, or the ranking of a search."""

from __future__ import annotations

from llmhpc.plan.cluster import Cluster
from llmhpc.plan.memory import GIB
from llmhpc.plan.search import Candidate
from llmhpc.plan.workload import Workload


def header(w: Workload, cluster: Cluster, stack_name: str, model_name: str) -> str:
    """What is planned: model, batch, precision, cluster."""
    params = w.shape.total_params / 1e9
    return (f"plan: {model_name} ({params:.1f} B params), {w.global_batch} x {w.seq_len} tokens per step, "
            f"{w.precision}, {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name} "
            f"({cluster.world_size} GPUs, {cluster.gpu.hbm_bytes / GIB:.0f} GiB each), stack={stack_name}")


def detail(c: Candidate, cluster: Cluster) -> str:
    """Memory breakdown and step-time breakdown of one layout."""
    mem, step = c.memory, c.step
    g = mem.gib()
    cap = cluster.gpu.hbm_bytes / GIB
    lines = [f"layout: {c.layout.describe()}  (valid for llmhpc)", "",
             f"memory per GPU (GiB, pipeline rank {mem.rank}):"]
    for key, label in (("params", "parameters (fp32, sharded)"), ("grads", "gradients (fp32)"),
                       ("optimizer", "optimizer state (AdamW)"), ("gathered", "gathered weights / DP buffers"),
                       ("activations", "activations (in flight)"), ("logits", "loss / logits"),
                       ("buffers", "runtime + fragmentation")):
        lines.append(f"  {label:<32} {g[key]:9.2f}")
    verdict = "fits" if c.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<32} {g['total']:9.2f}   of {cap:.0f} GiB: {verdict}")
    lines += ["", "time per step (s):"]
    for key, label in (("compute", "compute (incl. recompute)"), ("tp_comm", "tensor-parallel comm (exposed)"),
                       ("dp_comm", "data-parallel comm (exposed)"), ("pp_comm", "pipeline send/recv"),
                       ("bubble", "pipeline bubble"), ("optimizer", "optimizer step")):
        lines.append(f"  {label:<32} {getattr(step, key):9.3f}")
    lines.append(f"  {'step':<32} {step.step_time:9.3f}")
    rate = step.tokens_per_s_per_gpu
    lines += ["", f"tokens/s/GPU {rate:,.0f}   tokens/s {rate * step.world_size:,.0f}   "
              f"MFU {100 * step.mfu:.1f}% (of the dense bf16 peak)"]
    return "\n".join(lines)


def ranking(candidates: list[Candidate], top: int, cluster: Cluster) -> str:
    """The `top` fastest layouts that fit, as a table."""
    fitting = [c for c in candidates if c.fits][:top]
    if not fitting:
        smallest = min(candidates, key=lambda c: c.memory.total, default=None)
        hint = (f"; the smallest needs {smallest.memory.total / GIB:.0f} GiB per GPU ({smallest.layout.describe()})"
                if smallest else "")
        return f"no valid layout fits in {cluster.gpu.hbm_bytes / GIB:.0f} GiB per GPU{hint}"
    rows = [f"{'#':>2}  {'layout':<52} {'mem GiB':>8} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6}"]
    for i, c in enumerate(fitting, 1):
        rows.append(f"{i:>2}  {c.layout.describe():<52} {c.memory.total / GIB:8.1f} {c.step.step_time:8.2f} "
                    f"{c.step.tokens_per_s_per_gpu:10,.0f} {100 * c.step.mfu:5.1f}%")
    n_fit = sum(c.fits for c in candidates)
    rows.append(f"({len(candidates)} valid layouts searched, {n_fit} fit in memory)")
    return "\n".join(rows)
