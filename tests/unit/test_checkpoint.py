"""Checkpoint manager: atomic save, keep-last-k, exact restore, corrupt-checkpoint fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmhpc.checkpoint import CheckpointError, CheckpointManager, complete_checkpoints, read_meta
from llmhpc.checkpoint.manager import TMP_PREFIX


def make_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def train_steps(model, optimizer, n: int):
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        optimizer.step()


def save(manager, step, model, optimizer):
    return manager.save(step, model, optimizer, {"data": {"index": step}, "wandb_run_id": "abc"}, "stage: test\n")


def test_restore_is_exact_including_optimizer_and_rng(tmp_path):
    model, optimizer = make_model_and_optimizer(0)
    train_steps(model, optimizer, 3)
    save(CheckpointManager(tmp_path, keep_last=2), 3, model, optimizer)
    draw_after_save = torch.rand(4)
    torch.manual_seed(7)
    train_steps(model, optimizer, 2)  # continuing needs the optimizer moments, not just weights

    model2, optimizer2 = make_model_and_optimizer(1)
    meta = CheckpointManager(tmp_path, keep_last=2).resume(model2, optimizer2)
    assert meta["step"] == 3 and meta["data"] == {"index": 3} and meta["wandb_run_id"] == "abc"
    assert torch.equal(torch.rand(4), draw_after_save)
    torch.manual_seed(7)
    train_steps(model2, optimizer2, 2)
    for a, b in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_keep_last_k_never_deletes_newest(tmp_path):
    model, optimizer = make_model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        train_steps(model, optimizer, 1)
        save(manager, step, model, optimizer)
    assert [p.name for p in complete_checkpoints(manager.dir)] == ["step_0000003", "step_0000004"]


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    model, optimizer = make_model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, keep_last=3)
    save(manager, 1, model, optimizer)
    stale = manager.dir / f"{TMP_PREFIX}step_0000002-deadbeef"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    assert [p.name for p in complete_checkpoints(manager.dir)] == ["step_0000001"]
    CheckpointManager(tmp_path, keep_last=3)
    assert not stale.exists()


def test_truncated_checkpoint_falls_back_with_warning(tmp_path):
    model, optimizer = make_model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, keep_last=3)
    train_steps(model, optimizer, 1)
    save(manager, 1, model, optimizer)
    good = [p.detach().clone() for p in model.parameters()]
    train_steps(model, optimizer, 1)
    newest = save(manager, 2, model, optimizer)
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    with pytest.raises(CheckpointError, match="step_0000002.*corrupt"):
        read_meta(newest)
    warnings: list[str] = []
    model2, optimizer2 = make_model_and_optimizer(3)
    meta = CheckpointManager(tmp_path, keep_last=3, warn=warnings.append).resume(model2, optimizer2)
    assert meta["step"] == 1
    assert len(warnings) == 1 and "step_0000002" in warnings[0] and "falling back" in warnings[0]
    for a, b in zip(model2.parameters(), good, strict=True):
        assert torch.equal(a, b)


def test_corrupt_meta_is_named(tmp_path):
    model, optimizer = make_model_and_optimizer(0)
    manager = CheckpointManager(tmp_path)
    path = save(manager, 5, model, optimizer)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="step_0000005.*meta.json"):
        read_meta(path)
