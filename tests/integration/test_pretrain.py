"""`llmhpc pretrain` on the real corpus lowers the held-out loss; the non-finite guard works."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmhpc.checkpoint import latest_checkpoint, read_checkpoint_config, read_meta
from llmhpc.config import load_config
from llmhpc.config.layout import resolve_layout
from llmhpc.data.prepare import prepare_corpus
from llmhpc.data.pretrain import PackedTokens, eval_batches
from llmhpc.metrics.jsonl import read_metrics
from llmhpc.models import load_pretrained
from llmhpc.train.builder import RunContext, build
from llmhpc.train.objective import NextTokenObjective, causal_lm_loss
from llmhpc.train.trainer import Trainer, TrainingAborted
from tests.conftest import SMALL_RUN, run_cli


def test_pretrain_lowers_eval_loss_and_logs_throughput(tmp_path, llmhpc_cache):
    run_dir = tmp_path / "run"
    proc = run_cli(["pretrain", *SMALL_RUN, "trainer.max_steps=30", "trainer.eval_every=15",
                    "trainer.eval_batches=2", f"run.dir={run_dir}"], llmhpc_cache)
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2
    assert records[0]["loss"] > 10.0  # ln(49152) = 10.8 at random init
    assert evals[-1] < records[0]["loss"] - 2.5
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert (run_dir / "config.yaml").exists() and "done: step 30" in proc.stdout

    # The run directory is a model: load_pretrained reproduces the logged held-out loss.
    model, tokenizer = load_pretrained(run_dir)
    cfg = read_checkpoint_config(latest_checkpoint(run_dir / "checkpoints"))
    held_out = eval_batches(PackedTokens(prepare_corpus(cfg.data, seed=cfg.run.seed), "val"), 64, 4, 2)
    with torch.no_grad():
        sums = [causal_lm_loss(model, batch) for batch in held_out]
    reloaded = sum(float(s) for s, _ in sums) / sum(n for _, n in sums)
    assert reloaded == pytest.approx(evals[-1], abs=1e-5)
    assert tokenizer is not None and tokenizer.decode(held_out[0]["input_ids"][0][:8]).strip()

    # A later stage starts from this run: the weights carry over and the lineage is recorded.
    child_dir = tmp_path / "child"
    run_cli(["pretrain", *SMALL_RUN, "trainer.max_steps=2", f"model.init_from={run_dir}", f"run.dir={child_dir}",
             "precision=bf16"], llmhpc_cache)
    child = read_metrics(child_dir / "metrics.jsonl")
    assert child[0]["loss"] < records[0]["loss"] - 2.5  # starts where the parent ended, not at 10.8
    meta = read_meta(latest_checkpoint(child_dir / "checkpoints"))
    assert meta["lineage"]["init_from"] == str(run_dir)


def test_data_prepare_command_writes_reusable_shards(tmp_path, llmhpc_cache):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: to be, or not to be."}) + "\n" for i in range(20)))
    out = tmp_path / "shards"
    proc = run_cli(["data", "prepare", f"data.source={corpus}", f"data.path={out}", "data.val_fraction=0.1"],
                   llmhpc_cache)
    assert str(out) in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_documents"], meta["val_documents"]) == (18, 2)
    train = PackedTokens(out, "train")
    assert (train.tokens == train.separator_id).sum() == 18


class RandomTokens:
    """Random token batches (fine for a unit test of the loop; no corpus needed)."""

    def __init__(self, vocab: int, seq_len: int, batch: int):
        self.vocab, self.seq_len, self.batch, self.index = vocab, seq_len, batch, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.index)
        self.index += 1
        tokens = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=g)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


class PoisonedSteps(NextTokenObjective):
    """Next-token loss made NaN on the given (1-based) optimizer steps; 2 micro-batches per step."""

    def __init__(self, poisoned: set[int]):
        self.poisoned, self.calls = poisoned, 0

    def loss(self, head, hidden, batch):
        loss, metrics = super().loss(head, hidden, batch)
        self.calls += 1
        return (loss * math.nan if (self.calls - 1) // 2 + 1 in self.poisoned else loss), metrics


def tiny_trainer(tmp_path, objective, **trainer_overrides):
    overrides = [f"trainer.{k}={v}" for k, v in trainer_overrides.items()]
    cfg = load_config("pretrain", [*SMALL_RUN, "model.vocab_size=128", f"run.dir={tmp_path}", *overrides])
    built = build(cfg, RunContext(torch.device("cpu"), resolve_layout(cfg, 1)[1], None))
    return Trainer(built.cfg, built.engine, RandomTokens(128, 16, 4), objective), built.engine.model


def test_non_finite_steps_are_skipped_then_abort(tmp_path):
    trainer, model = tiny_trainer(tmp_path / "a", PoisonedSteps({3}), max_steps=4, max_bad_steps=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.fit()  # step 3 is skipped, training goes on
    assert result.step == 4
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    trainer, _ = tiny_trainer(tmp_path / "b", PoisonedSteps({3, 5, 6, 7}), max_steps=10, max_bad_steps=3)
    with pytest.raises(TrainingAborted, match="step 7: 3 steps in a row"):
        trainer.fit()
