"""Plot an SFT -> GRPO (or PPO) chain against wall-clock minutes: held-out accuracy of both runs, the RL run's mean
reward and, with --kl, its KL to the starting model.

    python tools/plot_grpo.py runs/sft runs/grpo docs/grpo_arithmetic.png --grpo-start-min 14.2 \
        --start-accuracy 0.025 --final-accuracy 0.52
    python tools/plot_grpo.py runs/sft runs/ppo docs/ppo_arithmetic.png --grpo-start-min 11.7 --label PPO --kl

Each run's steps are placed at the sum of their `step_time_s` (plus `--grpo-start-min` for the GRPO run, the
minute it started after the SFT run began); evals are the runs' own `eval_accuracy` on held-out problems; the
optional start / final points are `llmhpc eval` numbers on more problems, drawn as stars.
"""

from __future__ import annotations

import argparse
from itertools import accumulate
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmhpc.metrics.jsonl import read_metrics  # noqa: E402


def step_minutes(records: list[dict], offset: float = 0.0) -> list[float]:
    """Each step's end in wall-clock minutes: the running sum of its `step_time_s`, plus `offset`."""
    return [offset + s / 60 for s in accumulate(r["step_time_s"] for r in records)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sft_run", type=Path)
    parser.add_argument("grpo_run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--grpo-start-min", type=float, required=True)
    parser.add_argument("--start-accuracy", type=float, default=None)
    parser.add_argument("--final-accuracy", type=float, default=None)
    parser.add_argument("--final-min", type=float, default=None, help="where to draw --final-accuracy")
    parser.add_argument("--label", default="GRPO", help="the RL stage's name in the legend (default GRPO)")
    parser.add_argument("--kl", action="store_true", help="also plot the run's mean KL per answer (right axis)")
    args = parser.parse_args()
    sft, grpo = read_metrics(args.sft_run / "metrics.jsonl"), read_metrics(args.grpo_run / "metrics.jsonl")
    sft_t, grpo_t = step_minutes(sft), step_minutes(grpo, args.grpo_start_min)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    evals = [(t, r["eval_accuracy"]) for t, r in zip(sft_t, sft, strict=True) if "eval_accuracy" in r]
    ax.plot([t for t, _ in evals], [a for _, a in evals], "o-", color="tab:blue", label="SFT: held-out accuracy (32)")
    evals = [(t, r["eval_accuracy"]) for t, r in zip(grpo_t, grpo, strict=True) if "eval_accuracy" in r]
    ax.plot([t for t, _ in evals], [a for _, a in evals], "o-", color="tab:green",
            label=f"{args.label}: held-out accuracy (32)")
    window = 5
    rewards = [r["reward"] for r in grpo]
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
              for i in range(len(rewards))]
    ax.plot(grpo_t, smooth, color="tab:orange", lw=1,
            label=f"{args.label}: mean reward of sampled answers ({window}-step mean)")
    if args.kl:
        right = ax.twinx()
        right.plot(grpo_t, [r["kl"] for r in grpo], color="tab:red", lw=0.8, alpha=0.7)
        right.set_ylabel(f"{args.label}: mean KL per answer to the start (red)")
        right.set_ylim(bottom=0)
    if args.start_accuracy is not None:
        ax.plot([0], [args.start_accuracy], "*", ms=12, color="black", label="llmhpc eval, 200 problems")
    if args.final_accuracy is not None:
        ax.plot([args.final_min or grpo_t[-1]], [args.final_accuracy], "*", ms=12, color="black")
    ax.axvline(args.grpo_start_min, color="gray", lw=0.8, ls="--")
    ax.axhline(0.5, color="gray", lw=0.5, ls=":")
    ax.set_xlabel(f"wall-clock minutes on 2 CPU cores (SFT, then {args.label})")
    ax.set_ylabel("accuracy / reward")
    ax.set_ylim(0, 1)
    ax.set_title("SmolLM2-135M-Instruct on the shipped arithmetic problems")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
