"""Checkpoint manager: atomic save, keep-last-k, exact restore, corrupt-checkpoint fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmhpc.checkpoint import CheckpointError, CheckpointManager, Component, complete_checkpoints, read_meta
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
    return manager.save(step, [Component("model", model, optimizer)], {"wandb_run_id": "abc"}, "stage: test\n",
                        rank_state={"data": {"index": step}})


def resume(manager, model, optimizer):
    return manager.resume([Component("model", model, optimizer)])


def test_restore_is_exact_including_optimizer_and_rng(tmp_path):
    model, optimizer = make_model_and_optimizer(0)
    train_steps(model, optimizer, 3)
    save(CheckpointManager(tmp_path, keep_last=2), 3, model, optimizer)
    draw_after_save = torch.rand(4)
    torch.manual_seed(7)
    train_steps(model, optimizer, 2)  # continuing needs the optimizer moments, not just weights

    model2, optimizer2 = make_model_and_optimizer(1)
    meta = resume(CheckpointManager(tmp_path, keep_last=2), model2, optimizer2)
    assert meta["step"] == 3 and meta["rank"]["data"] == {"index": 3} and meta["wandb_run_id"] == "abc"
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
    meta = resume(CheckpointManager(tmp_path, keep_last=3, warn=warnings.append), model2, optimizer2)
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


WIDE = (8, 4096, 4)
"""In, hidden and out sizes of the frozen-half model: a first linear of 36,864 floats (144 KiB) that stays frozen,
a second of 16,388 floats that trains; big enough that tensor bytes dominate DCP's per-file overhead."""


def _frozen_half(seed: int, train: bool = False):
    """A model with its first linear frozen (as `trainer.freeze` leaves it) and AdamW over the rest."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(WIDE[0], WIDE[1]), nn.GELU(), nn.Linear(WIDE[1], WIDE[2]))
    for p in model[0].parameters():
        p.requires_grad_(train)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def _tensor_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.distcp"))


def test_a_frozen_half_is_not_written_and_resume_is_bitwise(tmp_path):
    base = {"source": "init", "seed": 0}
    model, optimizer = _frozen_half(0)
    train_steps(model, optimizer, 2)
    manager = CheckpointManager(tmp_path / "frozen")
    path = manager.save(2, [Component("model", model, optimizer, base=base)], {}, "stage: test\n")
    draw_after_save = torch.rand(3)
    full_model, full_optimizer = _frozen_half(0, train=True)
    full = CheckpointManager(tmp_path / "full").save(2, [Component("model", full_model, full_optimizer)], {}, "x\n")
    meta = read_meta(path)
    assert meta["components"]["model"] == {"frozen": ["0.weight", "0.bias"], "base": base}
    # On disk: the trained linear and its two AdamW moments (3 copies), not the frozen one; the same model
    # trained whole also writes the first linear and its moments.
    trained, frozen = (sum(p.numel() * 4 for p in part.parameters()) for part in (model[2], model[0]))
    overhead = 64 * 1024
    assert 3 * trained <= _tensor_bytes(path) < 3 * trained + overhead
    assert _tensor_bytes(full) - _tensor_bytes(path) >= 3 * frozen
    torch.manual_seed(7)
    train_steps(model, optimizer, 2)

    # Resume: the base is rebuilt (same seed), the trained half comes from the checkpoint, bitwise.
    model2, optimizer2 = _frozen_half(0)
    with torch.no_grad():
        model2[2].weight.mul_(0)  # make sure it is really loaded, not re-initialized alike
    meta2 = CheckpointManager(tmp_path / "frozen").resume([Component("model", model2, optimizer2, base=base)])
    assert meta2["step"] == 2 and torch.equal(torch.rand(3), draw_after_save)
    torch.manual_seed(7)
    train_steps(model2, optimizer2, 2)
    for a, b in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)

    # A checkpoint on another base is the wrong run, not a broken checkpoint: refused, not skipped.
    model3, optimizer3 = _frozen_half(0)
    other = Component("model", model3, optimizer3, base={"source": "init", "seed": 1})
    with pytest.raises(CheckpointError, match="on base source=init, seed=0.*seed=1"):
        CheckpointManager(tmp_path / "frozen").resume([other])


def test_several_components_save_and_load_by_name(tmp_path):
    policy, policy_opt = make_model_and_optimizer(0)
    value, value_opt = make_model_and_optimizer(1)
    train_steps(policy, policy_opt, 1)
    train_steps(value, value_opt, 2)
    CheckpointManager(tmp_path).save(3, [Component("policy", policy, policy_opt), Component("value", value, value_opt)],
                                     {}, "x\n")
    p2, po2 = make_model_and_optimizer(5)
    v2, vo2 = make_model_and_optimizer(6)
    CheckpointManager(tmp_path).resume([Component("policy", p2, po2), Component("value", v2, vo2)])
    for got, want in ((p2, policy), (v2, value)):
        for a, b in zip(got.parameters(), want.parameters(), strict=True):
            assert torch.equal(a, b)
    assert vo2.state_dict()["state"][0]["step"] == 2 and po2.state_dict()["state"][0]["step"] == 1
    with pytest.raises(CheckpointError, match="no component 'critic'.*policy, value"):
        CheckpointManager(tmp_path).load(complete_checkpoints(tmp_path / "checkpoints")[-1],
                                         [Component("critic", *make_model_and_optimizer(7))])


def test_format_1_checkpoints_still_load(tmp_path):
    """A checkpoint as pretraining wrote it before components: 'model' / 'optim' keys, one RNG state."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from llmhpc.checkpoint.manager import _encode_rng, single_process_ok

    model, optimizer = make_model_and_optimizer(0)
    train_steps(model, optimizer, 2)
    step_dir = tmp_path / "checkpoints" / "step_0000002"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(step_dir))
    (step_dir / "config.yaml").write_text("stage: test\n")
    meta = {"format_version": 1, "step": 2, "saved_at": 0.0, "rng": _encode_rng(), "data": {"index": 9}}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    train_steps(model, optimizer, 1)  # the original run goes on with the RNG state it saved
    model2, optimizer2 = make_model_and_optimizer(1)
    loaded = resume(CheckpointManager(tmp_path), model2, optimizer2)
    assert loaded["step"] == 2 and loaded["rank"]["data"] == {"index": 9}
    train_steps(model2, optimizer2, 1)  # the same draws follow: the restored RNG state is the saved one
    for a, b in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real file system that runs out of space (root only; skipped elsewhere)."""
    import shutil
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (it stands in for a full disk)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(small_disk):
    """The second save needs more than the disk has: a CheckpointError naming the directory, the step and the
    space (not torch's zip-writer error), no partial directory left holding space, the first checkpoint intact."""
    model, optimizer = make_model_and_optimizer(0)
    train_steps(model, optimizer, 1)
    manager = CheckpointManager(small_disk, keep_last=1)
    first = save(manager, 1, model, optimizer)
    big = nn.Linear(256, 256)  # 257 KiB of weights, twice that with AdamW's moments
    big_optimizer = torch.optim.AdamW(big.parameters())
    big(torch.randn(2, 256)).sum().backward()
    big_optimizer.step()
    with pytest.raises(CheckpointError) as failure:
        manager.save(2, [Component("model", big, big_optimizer)], {}, "stage: test\n")
    message = str(failure.value)
    assert "\n" not in message and str(manager.dir) in message and "step 2" in message
    assert " MiB free" in message and "step_0000001, is untouched" in message
    assert [p.name for p in manager.dir.iterdir()] == [first.name]  # the partial write was removed
    model2, optimizer2 = make_model_and_optimizer(1)
    assert resume(CheckpointManager(small_disk, keep_last=1), model2, optimizer2)["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), model.parameters(), strict=True))
