"""Corpus reading, corpus prep and the packed pretraining loader, on small real corpora.

Every corpus is written inside the test and tokenized with the real SmolLM2 tokenizer, so the
round trip text → tokens → text is checked for real, not against a stand-in.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmhpc.config.schema import DataConfig
from llmhpc.data.corpus import iter_documents
from llmhpc.data.prepare import prepare_corpus
from llmhpc.data.pretrain import PackedTokens, PretrainLoader, eval_batches
from llmhpc.errors import InputError

WORDS = "the king and queen of a castle walk slowly under grey sky while players speak verse".split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Varied documents: unicode, newlines, leading spaces and a quoted special token."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 60))]
        texts.append(f"Doc {i}: " + " ".join(words) + rng.choice([".", "!\n", " café — ünï 🎭", "\n\n"]))
    texts[1] = "  leading spaces and a literal <|endoftext|> inside the text"
    return texts


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMHPC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from llmhpc.data.tokenizer import load_tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMHPC_CACHE", str(tmp_path_factory.mktemp("tokenizer-cache")))
        return load_tokenizer("smollm2")


def test_a_saved_fast_tokenizer_loads_as_autotokenizer_loads_it(tokenizer, tmp_path: Path, monkeypatch) -> None:
    """A directory whose tokenizer_config.json names the generic fast class (our exports, the GGUF cache) is read
    without AutoTokenizer's model-config detour: the same tokens, special ids and chat template."""
    from transformers import AutoTokenizer

    import llmhpc.data.tokenizer as module

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))

    class NoAuto:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("AutoTokenizer was used")

    monkeypatch.setattr(module, "AutoTokenizer", NoAuto)
    ours = module.load_tokenizer(str(tmp_path / "tok"))
    chat = [{"role": "user", "content": "What is 17 + 25? Answer with 42."}]
    prompt = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for text in ("Hello, world! 123 45,678", prompt):
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (auto.bos_token_id, auto.eos_token_id,
                                                                         auto.pad_token_id)
    assert ours.chat_template == auto.chat_template and ours.added_tokens_decoder == auto.added_tokens_decoder


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def decode_docs(tokenizer, tokens: np.ndarray, separator_id: int) -> list[str]:
    """Split a token file at separators (it must end with one) and decode each document."""
    ids = tokens.tolist()
    assert not ids or ids[-1] == separator_id
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == separator_id:
            docs.append(tokenizer.decode(ids[start:i], skip_special_tokens=False))
            start = i + 1
    return docs


def split_docs(tokenizer, prep: Path) -> dict[str, list[str]]:
    return {
        s: decode_docs(tokenizer, PackedTokens(prep, s).tokens, PackedTokens(prep, s).separator_id)
        for s in ("train", "val")
    }


# --- corpus sources ---------------------------------------------------------------------------


def test_sources_yield_documents_in_order(tmp_path: Path) -> None:
    texts = make_texts(10)
    assert list(iter_documents(str(write_jsonl(tmp_path / "a.jsonl", texts)))) == texts

    table = pa.table({"body": texts, "n": list(range(10))})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "b.parquet").num_row_groups == 4
    assert list(iter_documents(str(tmp_path / "b.parquet"), text_field="body")) == texts

    root = tmp_path / "dir"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("second")
    (root / "a.md").write_text("# first\n")
    (root / "sub" / "c.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth"}\n')
    (root / "notes.csv").write_text("ignored")
    (root / ".hidden.txt").write_text("ignored")
    assert list(iter_documents(str(root))) == ["# first\n", "second", "third", "fourth"]


def test_jsonl_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"content": "no text here"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl, line 3: no field 'text'.*data\.text_field"):
        list(iter_documents(str(path)))


@pytest.mark.parametrize("name", ["doc.jsonl", "doc.txt"])
def test_non_utf8_byte_is_located_by_file_offset_and_line(tmp_path: Path, name: str) -> None:
    good = ['{"text": "caf\u00e9 ok"}\n'.encode(), b'{"text": "second line"}\n']
    bad = b'{"text": "latin-1 caf\xe9"}\n'
    path = tmp_path / name
    path.write_bytes(b"".join(good) + bad)
    offset = sum(len(line) for line in good) + bad.index(b"\xe9")  # independent of the reader's decoding
    with pytest.raises(InputError) as err:
        list(iter_documents(str(path)))
    assert str(err.value).startswith(f"{path.resolve()}: byte {offset} (line 3) is not valid UTF-8 (0xe9")
    assert "; convert the file to UTF-8" in str(err.value)


def test_missing_path_and_unsupported_extension(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        list(iter_documents(str(missing)))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        prepare_corpus(DataConfig(source=str(missing)))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(InputError, match=r"data\.csv: .*\.jsonl.*\.parquet"):
        list(iter_documents(str(tmp_path / "data.csv")))


# --- prep -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt_dir"])
def test_prepared_tokens_decode_to_every_document(tmp_path: Path, tokenizer, fmt: str) -> None:
    texts = make_texts(12)
    if fmt == "jsonl":
        source = write_jsonl(tmp_path / "c.jsonl", texts)
    elif fmt == "parquet":
        source = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": texts}), source, row_group_size=5)
    else:
        source = tmp_path / "txt"
        (source / "nested").mkdir(parents=True)
        for i, t in enumerate(texts):
            (source / ("nested" if i % 2 else "") / f"{i:02d}.txt").write_text(t)
    cfg = DataConfig(name="t", source=str(source), val_fraction=0.25)
    prep = prepare_corpus(cfg, seed=0, tokenizer=tokenizer)

    docs = split_docs(tokenizer, prep)
    assert sorted(docs["train"] + docs["val"]) == sorted(texts)
    meta = PackedTokens(prep, "train").meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tokenizer)
    assert (meta["train_documents"], meta["val_documents"]) == (9, 3)
    assert meta["train_tokens"] + meta["val_tokens"] == literal_token_count(tokenizer, texts)
    assert prep.parent == Path(os.environ["LLMHPC_CACHE"]) / "data" and prep.name.startswith("t-")
    assert not [p for p in prep.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"


def literal_token_count(tokenizer, texts: list[str]) -> int:
    """Tokens of the documents, special-token strings read as plain text, plus one separator each."""
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    try:
        return sum(len(backend.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
    finally:
        backend.encode_special_tokens = False


def test_split_is_by_whole_documents_and_seeded(tmp_path: Path, tokenizer) -> None:
    texts = make_texts(40)
    cfg = DataConfig(name="s", source=str(write_jsonl(tmp_path / "c.jsonl", texts)), val_fraction=0.2)
    a = prepare_corpus(cfg, seed=3, out_dir=tmp_path / "a", tokenizer=tokenizer)
    b = prepare_corpus(cfg, seed=3, out_dir=tmp_path / "b", tokenizer=tokenizer)
    c = prepare_corpus(cfg, seed=4, out_dir=tmp_path / "c", tokenizer=tokenizer)
    for split in ("train", "val"):
        assert (a / f"{split}.bin").read_bytes() == (b / f"{split}.bin").read_bytes()
    docs_a, docs_c = split_docs(tokenizer, a), split_docs(tokenizer, c)
    assert len(docs_a["val"]) == 8 and set(docs_a["val"]) | set(docs_a["train"]) == set(texts)
    assert not set(docs_a["val"]) & set(docs_a["train"])
    assert set(docs_a["val"]) != set(docs_c["val"])

    tiny = replace(cfg, source=str(write_jsonl(tmp_path / "tiny.jsonl", texts[:3])), val_fraction=0.01)
    meta = PackedTokens(prepare_corpus(tiny, tokenizer=tokenizer), "val").meta
    assert (meta["train_documents"], meta["val_documents"]) == (2, 1)
    no_val = PackedTokens(prepare_corpus(replace(tiny, val_fraction=0.0), tokenizer=tokenizer), "val")
    assert len(no_val) == 0 and no_val.meta["train_documents"] == 3


def test_complete_prep_is_reused_and_redone_when_source_changes(tmp_path: Path, tokenizer) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", make_texts(10))
    cfg = DataConfig(name="r", source=str(source))
    first = prepare_corpus(cfg, tokenizer=tokenizer)
    mtime = (first / "train.bin").stat().st_mtime_ns
    assert prepare_corpus(cfg) == first  # no tokenizer given: reuse must not need one
    assert (first / "train.bin").stat().st_mtime_ns == mtime

    write_jsonl(source, make_texts(11))
    second = prepare_corpus(cfg, tokenizer=tokenizer)
    assert second != first
    assert PackedTokens(second, "train").meta["train_documents"] + 1 == 11

    fixed = replace(cfg, path=str(tmp_path / "fixed"))
    out = prepare_corpus(fixed, tokenizer=tokenizer)
    tokens_before = (out / "train.bin").read_bytes()
    write_jsonl(source, make_texts(12, seed=1))
    assert prepare_corpus(fixed, tokenizer=tokenizer) == out
    assert (out / "train.bin").read_bytes() != tokens_before


def test_interrupted_prep_is_not_taken_as_complete(tmp_path: Path, tokenizer) -> None:
    texts = make_texts(10)
    cfg = DataConfig(name="i", source=str(write_jsonl(tmp_path / "c.jsonl", texts)), path=str(tmp_path / "p"))
    reference = prepare_corpus(replace(cfg, path=str(tmp_path / "ref")), tokenizer=tokenizer)

    out = tmp_path / "p"
    stale = tmp_path / ".p.tmp-99999-deadbeef"  # a crashed run's temp dir, complete-looking inside
    stale.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (stale / name).write_bytes((reference / name).read_bytes())
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x01\x00" * 7)  # partial output, no meta.json
    assert prepare_corpus(cfg, tokenizer=tokenizer) == out
    assert (out / "train.bin").read_bytes() == (reference / "train.bin").read_bytes()

    with (out / "train.bin").open("r+b") as f:  # meta.json present but the tokens cut short
        f.truncate(10)
    prepare_corpus(cfg, tokenizer=tokenizer)
    assert (out / "train.bin").read_bytes() == (reference / "train.bin").read_bytes()


# --- loader -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepped(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("prepped")
    cfg = DataConfig(name="l", source=str(write_jsonl(root / "c.jsonl", make_texts(60))), val_fraction=0.1)
    return prepare_corpus(cfg, seed=0, out_dir=root / "prep", tokenizer=tokenizer)


def batches(loader: PretrainLoader, n: int) -> list[dict]:
    return [loader.next_batch() for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_loader_is_seeded_and_labels_are_next_tokens(prepped: Path) -> None:
    tokens = PackedTokens(prepped, "train")
    a = batches(PretrainLoader(tokens, 16, 4, seed=1), 5)
    assert same(a, batches(PretrainLoader(tokens, 16, 4, seed=1), 5))
    assert not same(a, batches(PretrainLoader(tokens, 16, 4, seed=2), 5))
    flat = tokens.tokens.astype(np.int64)
    for batch in a:
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].shape == (4, 16) and str(batch["input_ids"].dtype) == "torch.int64"
        for row, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
            starts = [s for s in range(0, len(flat) - 16, 16) if np.array_equal(flat[s : s + 16], row)]
            assert starts, "a row is not an aligned window of the token stream"
            assert any(np.array_equal(flat[s + 1 : s + 17], labels) for s in starts)


def test_epoch_visits_every_window_once_and_rolls_over_inside_a_batch(prepped: Path) -> None:
    tokens = PackedTokens(prepped, "train")
    seq_len, micro = 16, 7
    loader = PretrainLoader(tokens, seq_len, micro, seed=0)
    n = loader.n_windows
    assert n == (len(tokens) - 1) // seq_len and n % micro != 0
    rows = np.concatenate([b["input_ids"].numpy() for b in batches(loader, n // micro + 2)])
    flat = tokens.tokens.astype(np.int64)
    expected = Counter(tuple(flat[i * seq_len : i * seq_len + seq_len]) for i in range(n))
    assert Counter(map(tuple, rows[:n])) == expected
    assert loader.state_dict()["epoch"] == 1
    assert not np.array_equal(rows[n : n + micro], rows[:micro])  # next epoch, another order


@pytest.mark.parametrize("masking", [False, True])
def test_resume_from_state_dict_gives_identical_batches(prepped: Path, masking: bool) -> None:
    tokens = PackedTokens(prepped, "train")
    original = PretrainLoader(tokens, 16, 5, seed=7, document_masking=masking)
    n_per_epoch = original.n_windows // 5
    for skip in (3, n_per_epoch - 1):  # mid-epoch, then just before the epoch boundary
        fresh_state = json.loads(json.dumps(original.state_dict()))
        batches(original, skip)
        state = json.loads(json.dumps(original.state_dict()))
        expected = batches(original, 4)
        restored = PretrainLoader(tokens, 16, 5, seed=7, document_masking=masking)
        restored.load_state_dict(state)
        assert same(batches(restored, 4), expected)
        assert fresh_state != state
    assert original.state_dict()["epoch"] >= 1
    with pytest.raises(InputError, match="seed"):
        PretrainLoader(tokens, 16, 5, seed=8).load_state_dict(state)


def test_document_ids_increase_after_each_separator(prepped: Path) -> None:
    tokens = PackedTokens(prepped, "train")
    sep = tokens.separator_id
    loader = PretrainLoader(tokens, 32, 8, seed=0, document_masking=True)
    seen_sep = 0
    for batch in batches(loader, 6):
        for row, ids in zip(batch["input_ids"].tolist(), batch["document_ids"].tolist(), strict=True):
            expected, doc = [], 0
            for t in row:
                expected.append(doc)
                doc += t == sep
            assert ids == expected
            seen_sep += row.count(sep)
    assert seen_sep > 10


def test_eval_batches_are_fixed_sequential_windows(prepped: Path) -> None:
    val = PackedTokens(prepped, "val")
    flat = val.tokens.astype(np.int64)
    got = eval_batches(val, 8, 2, n_batches=3)
    assert len(got) == 3 and same(got, eval_batches(val, 8, 2, n_batches=3))
    rows = np.concatenate([b["input_ids"].numpy() for b in got])
    labels = np.concatenate([b["labels"].numpy() for b in got])
    for i in range(6):
        assert np.array_equal(rows[i], flat[i * 8 : i * 8 + 8])
        assert np.array_equal(labels[i], flat[i * 8 + 1 : i * 8 + 9])
    assert "document_ids" in eval_batches(val, 8, 2, 1, document_masking=True)[0]


def test_split_shorter_than_a_window_is_a_clear_error(prepped: Path) -> None:
    val = PackedTokens(prepped, "val")
    with pytest.raises(InputError, match="fewer than seq_len"):
        PretrainLoader(val, len(val), 1, seed=0)
    with pytest.raises(InputError, match="fewer than seq_len"):
        eval_batches(val, len(val), 1, 1)


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_ranks_split_the_single_process_stream(prepped: Path, dp_size: int) -> None:
    """dp ranks read disjoint slices whose union, call by call, is what one process reads (also across epochs)."""
    tokens = PackedTokens(prepped, "train")
    micro, calls = 3, 40
    single = np.concatenate([b["input_ids"].numpy() for b in batches(PretrainLoader(tokens, 16, micro, 5), calls)])
    ranks = [PretrainLoader(tokens, 16, micro, 5, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    merged = np.concatenate(
        [np.concatenate([rank.next_batch()["input_ids"].numpy() for rank in ranks]) for _ in range(calls // dp_size)]
    )
    assert np.array_equal(merged, single[: len(merged)])
    assert all(r.state_dict() == ranks[0].state_dict() for r in ranks)
