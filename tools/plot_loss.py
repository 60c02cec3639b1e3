"""Plot train and eval loss of a run from its metrics.jsonl into a PNG (and held-out answer accuracy, when the run
logged `eval_accuracy`, on a second axis).

    python tools/plot_loss.py runs/shakespeare docs/pretrain_loss.png
    python tools/plot_loss.py runs/sft docs/sft_accuracy.png --start-accuracy 0.03   # the base model's, at step 0
    python tools/plot_loss.py runs/dpo docs/dpo.png --metric eval_reward_accuracy \
        --metric-label "held-out pairs ranked right" --ylabel "DPO loss"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmhpc.metrics.jsonl import read_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default=None)
    parser.add_argument("--start-accuracy", type=float, default=None,
                        help="the starting model's accuracy (llmhpc eval), drawn at step 0")
    parser.add_argument("--metric", default="eval_accuracy", help="eval fraction drawn in %% on the right axis")
    parser.add_argument("--metric-label", default="held-out answer accuracy")
    parser.add_argument("--ylabel", default="cross entropy (nats/token)", help="left axis (the losses)")
    args = parser.parse_args()
    records = read_metrics(args.run_dir / "metrics.jsonl")
    if not records:
        raise SystemExit(f"error: no metrics in {args.run_dir / 'metrics.jsonl'}")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", lw=1)
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(args.ylabel)
    ax.set_title(args.title or f"llmhpc: {args.run_dir.name}")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    scored = [r for r in evals if args.metric in r]
    if scored:
        steps, accuracy = [r["step"] for r in scored], [100 * r[args.metric] for r in scored]
        if args.start_accuracy is not None:
            steps, accuracy = [0, *steps], [100 * args.start_accuracy, *accuracy]
        right = ax.twinx()
        right.plot(steps, accuracy, "s-", color="tab:green", label=args.metric_label)
        right.set_ylabel(f"{args.metric_label} (%)")
        right.set_ylim(0, 100)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="center right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
