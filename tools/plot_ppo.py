"""Plot a `llmhpc ppo` run against its wall-clock minutes: the reward model's mean score of the sampled answers
(when it is part of the reward), the share of them that are right, the held-out accuracy of the run's evals, and
the KL to the starting model.

    python tools/plot_ppo.py runs/ppo docs/ppo_rm_arithmetic.png [--start-accuracy 0.405 --final-accuracy 0.44]
        [--start-score 16.3 --final-score 16.5]

Steps sit at the sum of their `step_time_s`; the optional start / final points are `llmhpc eval` numbers on more
held-out problems (accuracy; the reward model's mean score of the greedy answers with `judge=`), drawn as stars at
minute 0 and at the run's end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot_grpo import step_minutes  # noqa: E402  (tools/ is on the path when run as a script)

from llmhpc.metrics.jsonl import read_metrics  # noqa: E402


def _rollout_starts(records: list[dict]) -> list[int]:
    """Indices of the first step of each rollout (later PPO epochs repeat its rollout metrics)."""
    return [i for i, r in enumerate(records) if i == 0 or r["rollout"] != records[i - 1]["rollout"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--start-accuracy", type=float, default=None)
    parser.add_argument("--final-accuracy", type=float, default=None)
    parser.add_argument("--start-score", type=float, default=None, help="llmhpc eval judge_score before PPO")
    parser.add_argument("--final-score", type=float, default=None, help="llmhpc eval judge_score after PPO")
    parser.add_argument("--eval-problems", type=int, default=200, help="problems behind the stars (legend only)")
    args = parser.parse_args()
    records = read_metrics(args.run / "metrics.jsonl")
    minutes = step_minutes(records)
    starts = _rollout_starts(records)
    rollouts, t = [records[i] for i in starts], [minutes[i] for i in starts]
    scored = "reward_reward_model" in rollouts[0]
    judged = args.start_score is not None or args.final_score is not None
    panels = 3 if scored or judged else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 8 if panels == 3 else 5.5), dpi=120, sharex=True)
    middle, bottom = axes[-2:]
    end = minutes[-1]
    if panels == 3:
        top = axes[0]
        if scored:
            top.plot(t, [r["reward_reward_model"] for r in rollouts], ".-", color="tab:orange", lw=1,
                     label="sampled answers (the reward)")
        for minute, score in ((0.0, args.start_score), (end, args.final_score)):
            if score is not None:
                top.plot([minute], [score], "*", ms=12, color="black")
        if judged:
            top.plot([], [], "*", ms=12, color="black",
                     label=f"greedy answers, llmhpc eval, {args.eval_problems} problems")
        if judged and not scored:  # two points: at least 5 score units tall, so a small change looks small
            low, high = top.get_ylim()
            middle_y, half = (low + high) / 2, max((high - low) / 2, 2.5)
            top.set_ylim(middle_y - half, middle_y + half)
        top.set_ylabel("reward model's\nmean score")
        top.grid(alpha=0.3)
        top.legend(loc="upper left", fontsize=8)

    if "reward_correct" in rollouts[0]:
        middle.plot(t, [r["reward_correct"] for r in rollouts], ".-", color="tab:gray", lw=0.8,
                    label="sampled answers right (T = 1)")
    evals = [(m, r["eval_accuracy"]) for m, r in zip(minutes, records, strict=True) if "eval_accuracy" in r]
    middle.plot([m for m, _ in evals], [a for _, a in evals], "o-", color="tab:green",
                label="held-out greedy accuracy (the run's evals)")
    for minute, accuracy in ((0.0, args.start_accuracy), (end, args.final_accuracy)):
        if accuracy is not None:
            middle.plot([minute], [accuracy], "*", ms=12, color="black")
    if args.start_accuracy is not None or args.final_accuracy is not None:
        middle.plot([], [], "*", ms=12, color="black", label=f"llmhpc eval, {args.eval_problems} problems")
    middle.set_ylabel("accuracy")
    middle.set_ylim(0, 1)
    middle.grid(alpha=0.3)
    middle.legend(loc="upper left", fontsize=8)

    bottom.plot(t, [r["kl"] for r in rollouts], ".-", color="tab:red", lw=1, label="mean KL per answer")
    right = bottom.twinx()
    right.plot(t, [r["kl_coef"] for r in rollouts], color="tab:purple", lw=0.8, ls="--")
    right.set_ylabel("KL coefficient (dashed)")
    bottom.set_ylabel("KL to the start")
    bottom.set_xlabel("wall-clock minutes of the PPO run on 2 CPU cores")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper left", fontsize=8)

    fig.suptitle("PPO on SmolLM2-135M-Instruct, the shipped arithmetic problems")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
