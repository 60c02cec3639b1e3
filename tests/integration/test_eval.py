"""`llmhpc eval`: perplexity against transformers' loss on the same windows, a quantized export beside its
baseline, and greedy answer accuracy against transformers' own greedy decoding of the real SmolLM2."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmhpc.assets import smollm2_gguf
from llmhpc.config.schema import DataConfig
from llmhpc.errors import InputError
from llmhpc.models import load_pretrained
from llmhpc.models.hf import config_to_hf, state_dict_to_hf
from llmhpc.scoring.answers import accuracy, last_number, question_from_row, read_questions
from llmhpc.scoring.perplexity import held_out_windows
from tests.conftest import run_cli


def _hf_model(model) -> LlamaForCausalLM:
    """transformers' Llama carrying our model's weights (our name mapping is checked in test_convert_hf)."""
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(model.cfg))).eval()
    hf.load_state_dict(state_dict_to_hf(model.state_dict()), strict=False)
    hf.tie_weights()
    return hf


def test_numbers_are_read_as_written_and_bad_rows_are_named(tmp_path):
    assert last_number("so 3 + 4 = 7. The answer is 1,250.") == 1250
    assert last_number("it drops to -12.5 degrees") == Fraction(-25, 2)
    assert last_number("no digits here") is None
    assert question_from_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                           {"role": "user", "content": "q2"}], "answer": 4}).chat[-1] == ("user", "q2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "x", "answer": "four"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl, line 2: .*holds no number"):
        read_questions(bad)
    with pytest.raises(InputError, match="missing.jsonl: question file not found"):
        read_questions(tmp_path / "missing.jsonl")


def test_perplexity_equals_transformers_loss_and_a_quantized_export_sits_beside_it(
    tp2_pp2_checkpoint, llmhpc_cache, tmp_path
):
    q8 = tmp_path / "q8_0.gguf"
    run_cli(["convert", f"src={tp2_pp2_checkpoint}", "to=gguf", "quant=q8_0", f"dst={q8}"], llmhpc_cache)
    out = tmp_path / "eval.json"
    proc = run_cli(["eval", f"model.init_from={tp2_pp2_checkpoint}", f"baseline={q8}", "seq_len=64",
                    "max_windows=6", "batch_size=4", "task=perplexity,arithmetic", "problems=3",
                    "max_new_tokens=4", f"output={out}"], llmhpc_cache)
    results = json.loads(out.read_text())
    ours, quantized = results[str(tp2_pp2_checkpoint)]["perplexity"], results[str(q8)]["perplexity"]
    assert f"{ours['perplexity']:.4g}" in proc.stdout and f"{quantized['perplexity']:.4g}" in proc.stdout
    # A model trained two steps on Shakespeare answers no word problem, and 4 tokens never reach an end token.
    arithmetic = results[str(tp2_pp2_checkpoint)]["arithmetic"]
    assert arithmetic == {"accuracy": 0.0, "truncated": 1.0, "questions": 3.0}

    windows = held_out_windows(DataConfig(), 1234, 64, 6)  # the run's corpus, seed and tokenizer
    model, _ = load_pretrained(tp2_pp2_checkpoint)
    with torch.no_grad():
        hf = _hf_model(model)
        logits = hf(windows[:, :-1]).logits
    reference = math.exp(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())))
    assert ours["tokens"] == 6 * 64  # windows of 65 tokens, the last 64 of each predicted
    assert ours["perplexity"] == pytest.approx(reference, rel=1e-3)
    # 8-bit blocks move a few-logit-wide distribution very little; a wrong dequantization moves it far.
    assert quantized["perplexity"] == pytest.approx(ours["perplexity"], rel=0.01)
    assert quantized["perplexity"] != ours["perplexity"]


def _greedy_reply(hf, tokenizer, text: str, max_new: int) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(ids, add_special_tokens=False)])
    out = hf.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_accuracy_follows_transformers_greedy_replies():
    model, tokenizer = load_pretrained(smollm2_gguf())
    hf = _hf_model(model)
    questions = ["What is 12 + 30?", "Tom has 7 apples and buys 5 more. How many apples does he have?",
                 "What is 9 times 6?", "A car drives 120 km in 2 hours. What is its speed in km per hour?"]
    numbers = []
    for q in questions:  # the reference: transformers' greedy reply and the last integer in it (a plain regex)
        found = re.findall(r"-?\d+", _greedy_reply(hf, tokenizer, q, 24).replace(",", ""))
        numbers.append(int(found[-1]) if found else None)
    assert sum(n is not None for n in numbers) >= 2, numbers
    # The first two rows carry transformers' number (right), the last two that number plus one (wrong).
    rows = [{"prompt": q, "answer": str((n or 0) + (i >= 2))}
            for i, (q, n) in enumerate(zip(questions, numbers, strict=True))]
    expected = sum(n is not None for n in numbers[:2]) / 4
    got = accuracy(model, tokenizer, [question_from_row(r) for r in rows], max_new_tokens=24, batch_size=2)
    assert got["accuracy"] == expected, (numbers, got)
    assert got["questions"] == 4
