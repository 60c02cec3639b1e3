"""SFT data: chat rows → assistant-only labels → packed, resumable batches (llmhpc.data.sft / chat).

Everything runs on the real SmolLM2 tokenizer and its own chat template; the packing test runs a tiny random
Llama with that vocabulary, so the packed-equals-alone check goes through the real forward (position_ids and
document_ids) and the objective the trainer uses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from llmhpc.config.schema import ModelConfig
from llmhpc.data import arithmetic
from llmhpc.data.chat import CHATML, ChatRenderer
from llmhpc.data.sft import (
    IGNORE_INDEX,
    SFTLoader,
    first_fit,
    load_sft_examples,
    make_sft_batch,
    sft_eval_batches,
    split_examples,
)
from llmhpc.data.tokenizer import load_tokenizer
from llmhpc.errors import InputError
from llmhpc.models import build_model
from llmhpc.train import losses
from llmhpc.train.objective import NextTokenObjective, model_inputs

END = "<|im_end|>"
WORDS = "the cat sat on a warm mat while rain fell softly over seven quiet hills and rivers".split()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def _sentence(rng: random.Random, lo: int = 2, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + rng.choice([".", "?", "!\n", " 42."])


def _chat(rng: random.Random, turns: int, system: bool) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You answer briefly. " + _sentence(rng)}] if system else []
    for _ in range(turns):
        messages += [{"role": "user", "content": _sentence(rng)}, {"role": "assistant", "content": _sentence(rng)}]
    return messages


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _runs(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Maximal runs of consecutive masked tokens."""
    runs, current = [], []
    for token, on in zip(tokens.tolist(), mask.tolist(), strict=True):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_ignore_index_is_the_losses_one() -> None:
    assert IGNORE_INDEX == losses.IGNORE_INDEX


# ---- (a) the assistant mask -------------------------------------------------------------------------


@pytest.mark.parametrize("last_turn_only", [False, True])
def test_mask_is_exactly_the_assistant_turns(tmp_path: Path, tokenizer, last_turn_only: bool) -> None:
    rng = random.Random(0)
    chats = [_chat(rng, turns=rng.randint(1, 4), system=i % 2 == 0) for i in range(12)]
    source = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    examples, report = load_sft_examples(source, tokenizer, 1024, last_turn_only=last_turn_only)
    assert report.kept == len(chats) and not report.skipped
    for chat, example in zip(chats, examples, strict=True):
        # Independent of the renderer: the masked runs decode to the assistant contents, each + the end token.
        answers = [m["content"] + END for m in chat if m["role"] == "assistant"]
        want = answers[-1:] if last_turn_only else answers
        assert [tokenizer.decode(run) for run in _runs(example.tokens, example.assistant)] == want
        # The tokens are the template's own rendering (up to the last assistant token) tokenized in one go.
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        assert full.endswith(END + "\n")  # SmolLM2's ChatML: the newline after the last turn is not kept
        assert example.tokens.tolist() == tokenizer.encode(full[:-1], add_special_tokens=False)
        if chat[0]["role"] != "system":  # SmolLM2's template adds its default system prompt, never learned
            assert tokenizer.decode(example.tokens[:30]).startswith("<|im_start|>system\nYou are a helpful AI")
        # Labels: next tokens where those are the assistant's.
        batch = make_sft_batch([[example]], example.length, pack=False)
        labels = batch["labels"][0].numpy()
        assert labels.tolist() == np.where(example.assistant[1:], example.tokens[1:], IGNORE_INDEX).tolist()
        assert batch["input_ids"][0].tolist() == example.tokens[:-1].tolist()
        # Rounded up to a multiple of 4 (tensor parallel's sequence split): padding that carries no loss.
        wide = make_sft_batch([[example]], 10_000, pack=False, pad_id=7, width_multiple=4)
        width = wide["input_ids"].shape[1]
        assert width % 4 == 0 and example.length <= width < example.length + 4
        assert torch.equal(wide["labels"][0, : example.length], batch["labels"][0])
        assert set(wide["labels"][0, example.length :].tolist()) <= {IGNORE_INDEX}
        assert set(wide["input_ids"][0, example.length :].tolist()) <= {7}


def test_explicit_templates_and_template_checks(tmp_path: Path, tokenizer) -> None:
    chat = _chat(random.Random(1), turns=2, system=False)
    source = _write_jsonl(tmp_path / "one.jsonl", [{"messages": chat}])
    # 'chatml' and the same template from a file: no default system prompt, the same mask rule.
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML, encoding="utf-8")
    for template in ("chatml", str(template_file), CHATML):
        (example,), _ = load_sft_examples(source, tokenizer, 512, chat_template=template)
        assert tokenizer.decode(example.tokens).startswith("<|im_start|>user\n")
        runs = [tokenizer.decode(r) for r in _runs(example.tokens, example.assistant)]
        assert runs == [m["content"] + END for m in chat if m["role"] == "assistant"]
    # A template whose turns do not extend the earlier text, and one whose generation prompt ends in a space
    # that the first answer token would absorb: both are reported per row, never masked approximately.
    unstable = "{{ messages|length }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
    merging = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    for template in (unstable, merging):
        with pytest.raises(InputError, match=r"one\.jsonl, line 1: .*(does not extend|a token spans)"):
            load_sft_examples(source, tokenizer, 512, chat_template=template, on_error="fail")
    with pytest.raises(InputError, match="missing.jinja: data.chat_template is neither a file"):
        ChatRenderer(tokenizer, str(tmp_path / "missing.jinja"))


def test_mistral_style_template_with_a_sentencepiece_style_tokenizer() -> None:
    """Another family: BOS from the template, [INST] blocks, </s> ending each answer, Metaspace ('▁') tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(6)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special, show_progress=False)
    backend.train_from_iterator([_sentence(rng) for _ in range(500)], trainer)
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    sp.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    for _ in range(5):
        chat = _chat(rng, turns=3, system=False)
        rendered = ChatRenderer(sp).render(chat)
        tokens, mask = np.asarray(rendered.input_ids), np.asarray(rendered.assistant_mask)
        assert tokens.tolist() == sp.encode(sp.apply_chat_template(chat, tokenize=False), add_special_tokens=False)
        runs = [sp.decode(run).lstrip() for run in _runs(tokens, mask)]  # the decoder drops the first '▁' or not
        assert runs == [m["content"] + "</s>" for m in chat if m["role"] == "assistant"]


# ---- (f) no chat template ---------------------------------------------------------------------------


def test_no_chat_template_is_one_line_error_naming_the_fix(tmp_path: Path, tokenizer, monkeypatch) -> None:
    source = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "completion": "hello"}])
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(InputError) as info:
        load_sft_examples(source, tokenizer, 128)
    message = str(info.value)
    assert "\n" not in message and "no chat template" in message and "data.chat_template" in message
    (example,), _ = load_sft_examples(source, tokenizer, 128, chat_template="chatml")  # the fix works
    assert tokenizer.decode(example.tokens[example.assistant]) == "hello" + END


# ---- (c) malformed rows -----------------------------------------------------------------------------


def test_malformed_rows_are_reported_with_file_and_line(tmp_path: Path, tokenizer) -> None:
    good = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    rows = [
        good,  # 1
        '{"messages": [',  # 2 bad JSON
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},  # 3 missing role
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # 4 empty
        {"prompt": "long " * 400, "completion": "ok"},  # 5 too long
        "",  # 6 blank: not a row
        "[1, 2]",  # 7 not an object
        {"text": "plain"},  # 8 neither messages nor prompt/completion
        {"messages": [{"role": "assitant", "content": "typo"}]},  # 9 unknown role
        {"messages": [{"role": "user", "content": "only a question"}]},  # 10 nothing to learn
        {"prompt": "q", "completion": ""},  # 11 empty completion
        {"prompt": "q", "completion": "a"},  # 12 good
    ]
    source = _write_jsonl(tmp_path / "rows.jsonl", rows)
    with source.open("ab") as f:
        f.write(b'{"prompt": "caf\xe9", "completion": "x"}\n')  # 13 not UTF-8
    examples, report = load_sft_examples(source, tokenizer, 256)
    assert [e.where for e in examples] == [f"{source}, line 1", f"{source}, line 12"]
    assert report.rows == 12 and report.kept == 2
    expected = {
        "bad_json": 1, "missing_role": 1, "empty_assistant": 2, "too_long": 1, "not_object": 1, "no_messages": 1,
        "bad_role": 1, "no_assistant": 1, "bad_utf8": 1,
    }  # fmt: skip
    assert dict(report.skipped) == expected
    lines = sorted(int(p.split(", line ")[1].split(":")[0]) for p in report.problems)
    assert lines == [2, 3, 4, 5, 7, 8, 9, 10, 11, 13]
    assert all(p.startswith(f"{source}, line ") for p in report.problems)
    assert "10 skipped" in report.summary() and "empty_assistant 2" in report.summary()
    # fail: the first malformed row stops everything, with its line and the fix.
    with pytest.raises(InputError, match=r"rows\.jsonl, line 2: invalid JSON .*data\.on_error=skip"):
        load_sft_examples(source, tokenizer, 256, on_error="fail")
    # Parquet rows are numbered over the file.
    table = pa.table({"prompt": ["a", "b", "c"], "completion": ["x", " ", "z"]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)
    examples, report = load_sft_examples(tmp_path / "rows.parquet", tokenizer, 256)
    assert len(examples) == 2 and report.problems == [f"{tmp_path / 'rows.parquet'}, row 2: 'completion' is empty"]
    # A Parquet 'messages' column (list of structs, as datasets writes it): a null role is a missing role.
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    broken = [{"role": None, "content": "hi"}, {"role": "assistant", "content": "hello"}]
    pq.write_table(pa.table({"messages": [chat, broken]}), tmp_path / "chats.parquet")
    examples, report = load_sft_examples(tmp_path / "chats.parquet", tokenizer, 256)
    assert tokenizer.decode(examples[0].tokens[examples[0].assistant]) == "hello" + END
    assert dict(report.skipped) == {"missing_role": 1} and ", row 2: 'messages' message 1 has no" in report.problems[0]
    # Nothing usable at all: one error with the counts.
    (tmp_path / "bad").mkdir()
    _write_jsonl(tmp_path / "bad" / "x.jsonl", ["{"])
    with pytest.raises(InputError, match="no usable SFT example .*bad_json 1"):
        load_sft_examples(tmp_path / "bad", tokenizer, 256)


# ---- (e) the package's arithmetic files -------------------------------------------------------------


def test_arithmetic_files_load(tmp_path: Path, tokenizer) -> None:
    train, eval_set = arithmetic.train_eval_split(30, 10, seed=3)
    arithmetic.write_jsonl(train, tmp_path / "arith" / "train.jsonl")
    arithmetic.write_jsonl(eval_set, tmp_path / "arith" / "eval.jsonl")
    examples, report = load_sft_examples(tmp_path / "arith", tokenizer, 512)
    assert report.rows == report.kept == 40 and not report.skipped
    problems = eval_set + train  # the directory is read in sorted file order: eval.jsonl, train.jsonl
    for problem, example in zip(problems, examples, strict=True):
        assert tokenizer.decode(example.tokens[example.assistant]) == problem.solution + END
    # The same rows in prompt / completion form only give the same tokens and masks.
    rows = [{k: v for k, v in p.to_row().items() if k != "messages"} for p in problems]
    again, _ = load_sft_examples(_write_jsonl(tmp_path / "pc.jsonl", rows), tokenizer, 512)
    for a, b in zip(examples, again, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist() and a.assistant.tolist() == b.assistant.tolist()


# ---- (b) packing gives each example its own loss ----------------------------------------------------


VOCAB = 1024
"""The tiny model's vocabulary: token ids are folded into it (id % VOCAB) for the forward, which keeps the model
small (a 49k-row random embedding costs seconds to initialize) and changes nothing about packing."""


def _fold(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(batch, input_ids=batch["input_ids"] % VOCAB)
    out["labels"] = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["labels"] % VOCAB)
    return out


def test_packed_loss_equals_each_example_alone(tmp_path: Path, tokenizer) -> None:
    rng = random.Random(4)
    chats = [_chat(rng, turns=rng.randint(1, 3), system=rng.random() < 0.5) for _ in range(10)]
    source = _write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in chats])
    seq_len = 256
    examples, _ = load_sft_examples(source, tokenizer, seq_len)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=seq_len, init_std=0.1)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    objective = NextTokenObjective()  # the trainer's objective, unchanged: it forwards the packing keys itself
    loader = SFTLoader(examples, seq_len, micro_batch_size=2, seed=0)
    rows = loader.epoch_rows()[:2]
    assert max(len(r) for r in rows) >= 3, rows  # the check is about packing several conversations
    batch = loader.next_batch()
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
    folded = _fold(batch)
    with torch.no_grad():
        packed = model(**model_inputs(folded))
        packed_out = objective(model, folded)
        alone_sum, alone_count, worst = 0.0, 0, 0.0
        for b, row in enumerate(rows):
            start = 0
            for j in row:
                example = examples[j]
                n = example.length
                alone_batch = make_sft_batch([[example]], n, pack=False)
                assert torch.equal(batch["labels"][b, start : start + n], alone_batch["labels"][0])
                assert torch.equal(batch["position_ids"][b, start : start + n], torch.arange(n))
                alone_batch = _fold(alone_batch)
                labels = alone_batch["labels"][0]
                alone = model(alone_batch["input_ids"])[0]
                per_token_packed = F.cross_entropy(packed[b, start : start + n], labels, reduction="none")
                per_token_alone = F.cross_entropy(alone, labels, reduction="none")
                worst = max(worst, (per_token_packed - per_token_alone).abs().max().item())
                alone_sum += per_token_alone.sum().item()
                alone_count += int((labels != IGNORE_INDEX).sum())
                start += n
            assert (batch["labels"][b, start:] == IGNORE_INDEX).all()  # padding carries no loss
            assert (batch["document_ids"][b, start:] == len(row)).all()
        print(f"packed vs alone: max per-token loss diff {worst:.3g}")
        assert worst <= 1e-5
        assert packed_out.count == alone_count == sum(examples[j].n_labels for r in rows for j in r)
        assert abs(packed_out.loss.item() - alone_sum) <= 1e-5 * alone_sum
        # Without the packing keys the conversations see each other: the check has teeth.
        assert (model(folded["input_ids"]) - packed).abs().max().item() > 1e-2


def test_first_fit_is_first_fit() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 300).tolist()
    order = rng.permutation(300).tolist()
    rows = first_fit(lengths, order, 64)
    free: list[int] = []
    expected: list[list[int]] = []
    for i in order:  # the plain O(n * rows) definition
        r = next((k for k, room in enumerate(free) if room >= lengths[i]), None)
        if r is None:
            free.append(64)
            expected.append([])
            r = len(free) - 1
        free[r] -= lengths[i]
        expected[r].append(i)
    assert rows == expected


# ---- (d) resume, data-parallel slices, held-out split ----------------------------------------------


def _examples(tmp_path: Path, tokenizer, n: int = 24):
    rng = random.Random(5)
    rows = [{"messages": _chat(rng, turns=rng.randint(1, 2), system=False)} for _ in range(n)]
    return load_sft_examples(_write_jsonl(tmp_path / "r.jsonl", rows), tokenizer, 200)[0]


@pytest.mark.parametrize("pack", [True, False])
def test_resume_gives_the_same_batches(tmp_path: Path, tokenizer, pack: bool) -> None:
    examples = _examples(tmp_path, tokenizer)
    loader = SFTLoader(examples, 200, micro_batch_size=3, seed=7, pack=pack)
    per_epoch = len(loader.epoch_rows())
    k = per_epoch // 6 + 1  # saved inside epoch 0; the batches after it cross into the next epochs
    for _ in range(k):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["epoch"] == 0 < state["index"]
    expected = [loader.next_batch() for _ in range(per_epoch)]
    resumed = SFTLoader(examples, 200, micro_batch_size=3, seed=7, pack=pack)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
    assert loader.epoch >= 1 and loader.state_dict() == resumed.state_dict()
    # Epochs are reshuffled, and another seed or other data is refused on resume.
    assert loader.epoch_rows(0) != loader.epoch_rows(1)
    with pytest.raises(InputError, match="seed=7 but this data gives 8"):
        SFTLoader(examples, 200, 3, seed=8, pack=pack).load_state_dict(state)
    with pytest.raises(InputError, match="n_examples"):
        SFTLoader(examples[1:], 200, 3, seed=7, pack=pack).load_state_dict(state)


def test_data_parallel_ranks_split_the_one_process_stream(tmp_path: Path, tokenizer) -> None:
    examples = _examples(tmp_path, tokenizer)
    single = SFTLoader(examples, 200, micro_batch_size=4, seed=1)
    ranks = [SFTLoader(examples, 200, micro_batch_size=2, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        want = single.next_batch()
        got = [rank.next_batch() for rank in ranks]
        for key in want:
            assert torch.equal(torch.cat([g[key] for g in got]), want[key])


def test_held_out_split_and_eval_batches(tmp_path: Path, tokenizer) -> None:
    examples = _examples(tmp_path, tokenizer, n=40)
    train, val = split_examples(examples, 0.25, seed=0)
    assert len(train) + len(val) == 40 and 3 <= len(val) <= 20
    assert not {e.digest for e in train} & {e.digest for e in val}
    # Decided per example: the same split for shuffled rows, another for another seed.
    shuffled = examples[::-1]
    assert {e.digest for e in split_examples(shuffled, 0.25, seed=0)[1]} == {e.digest for e in val}
    assert {e.digest for e in split_examples(examples, 0.25, seed=1)[1]} != {e.digest for e in val}
    assert split_examples(examples, 0.0, seed=0) == (examples, [])
    assert len(split_examples(examples[:2], 0.01, seed=0)[1]) == 1  # a fraction > 0 always holds one out
    batches = sft_eval_batches(val, 200, micro_batch_size=2, n_batches=10)
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) == sum(e.n_labels for e in val)
    again = sft_eval_batches(val, 200, micro_batch_size=2, n_batches=10)  # fixed: the same every time
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again, strict=True) for k in a)
    assert len(sft_eval_batches(val, 200, micro_batch_size=1, n_batches=1)) == 1
