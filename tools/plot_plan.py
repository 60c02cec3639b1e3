"""Plot the planner's estimated tokens/s/GPU for every layout of a run (default: Llama-3-70B on 64 H100s).

    python tools/plot_plan.py docs/plan_70b.png [overrides...]

For each (tp, pp, data-parallel flavour) the fastest schedule / micro-batch / AC setting that fits is shown;
where none fits, the one needing least memory is shown hatched, at the speed it would have.
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmhpc.config import load_config  # noqa: E402
from llmhpc.plan.cluster import Cluster  # noqa: E402
from llmhpc.plan.efficiency import stack  # noqa: E402
from llmhpc.plan.search import search  # noqa: E402

DEFAULT = ["model=llama3_70b", "cluster=h100_8x8", "trainer.seq_len=8192", "trainer.global_batch_size=128",
           "precision=bf16"]


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config("plan", [*DEFAULT, *overrides])
    cluster = Cluster.of(cfg.cluster)
    found = search(cfg, cluster, stack(cfg.plan.stack), set())
    groups: dict[tuple, list] = {}
    for c in found:
        lay = c.layout
        flavour = "ddp" if lay.dp_shard == 1 and lay.dp_replicate > 1 else "hsdp" if lay.dp_replicate > 1 else "fsdp"
        groups.setdefault((lay.tp, lay.pp, flavour), []).append(c)
    # Per group: the fastest setting that fits, else the one needing least memory.
    best = [next((c for c in g if c.fits), None) or min(g, key=lambda c: c.memory.total) for g in groups.values()]
    rows = sorted(best, key=lambda c: (not c.fits, -c.step.tokens_per_s_per_gpu))[:24]
    fig, ax = plt.subplots(figsize=(10, 7))
    labels = [c.layout.describe() for c in rows]
    values = [c.step.tokens_per_s_per_gpu for c in rows]
    colors = ["tab:blue" if c.fits else "lightgray" for c in rows]
    bars = ax.barh(range(len(rows)), values, color=colors)
    for bar, c in zip(bars, rows, strict=True):
        if not c.fits:
            bar.set_hatch("//")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {c.memory.total / 2**30:.0f} GiB",
                va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("estimated tokens/s/GPU (label: estimated peak memory per GPU)")
    ax.set_title(f"{cfg.model.name}, {cfg.trainer.global_batch_size} x {cfg.trainer.seq_len} tokens, "
                 f"{cfg.precision.name}, {cluster.world_size} x {cluster.gpu.name}\n"
                 "per tp / pp / dp flavour: fastest setting that fits (blue), else the smallest (grey, hatched)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out} ({len(found)} valid layouts, {sum(c.fits for c in found)} fit)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/plan_70b.png", sys.argv[2:])
