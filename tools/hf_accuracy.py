"""Greedy held-out arithmetic accuracy of a Hugging Face model directory, decoded by `transformers` itself.

    llmhpc convert src=runs/grpo to=hf dst=exports/grpo-hf
    python tools/hf_accuracy.py exports/grpo-hf --problems 200      # beside: llmhpc eval model.init_from=runs/grpo

The check that an export keeps what training reached: the questions, chat template, answer budget and grading are
those of `llmhpc eval task=arithmetic` (the first N held-out problems of run.seed 1234, 128 new tokens, the last
number of the reply against the answer), but the model is `AutoModelForCausalLM` and the decoding its `generate`
(greedy, left-padded batches).
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234, help="run.seed whose held-out pool is asked")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmhpc.data.arithmetic import held_out_problems
    from llmhpc.scoring.answers import last_number, question_from_row

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    questions = [question_from_row(p.to_row()) for p in held_out_problems(args.problems, args.seed)]
    correct = truncated = 0
    for first in range(0, len(questions), args.batch):
        batch = questions[first:first + args.batch]
        texts = [tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in q.chat], tokenize=False,
                                               add_generation_prompt=True) for q in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for question, row in zip(batch, out[:, inputs["input_ids"].shape[1]:], strict=True):
            tokens = row.tolist()
            ended = tokenizer.eos_token_id in tokens
            truncated += not ended
            reply = tokenizer.decode(tokens, skip_special_tokens=True)
            got = last_number(reply)
            correct += got is not None and got == last_number(question.answer)
    n = len(questions)
    print(json.dumps({"model": args.model_dir, "accuracy": correct / n, "truncated": truncated / n,
                      "questions": n}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
