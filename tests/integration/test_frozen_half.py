"""`trainer.freeze`: a run with a frozen half checkpoints only the trained half and resumes bitwise.

The tiny model's embedding (tied to the head) and first block are frozen; only the other block and the
final norm train. Its checkpoints must hold only those weights and their AdamW moments (on disk: a small
fraction of the full run's), record where the frozen half comes from (the seeded init), and a run stopped
after step 2 and restarted must reproduce the uninterrupted losses and trained weights bitwise (fp32).
"""

from __future__ import annotations

import torch

from llmhpc.checkpoint import latest_checkpoint, read_meta
from llmhpc.models import build_model, load_pretrained
from tests.conftest import SMALL_RUN, run_cli
from tests.distributed.launch import copy_run_stopped_at, step_losses

STEPS = 4
FREEZE = "trainer.freeze=[tok_embeddings.weight,layers.0.*]"
COMMON = [*SMALL_RUN, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=2", "trainer.keep_last=3"]


def _tensor_bytes(step_dir) -> int:
    return sum(f.stat().st_size for f in step_dir.glob("*.distcp"))


def test_frozen_half_saves_only_what_trains_and_resumes_bitwise(tmp_path, llmhpc_cache):
    full, frozen, resumed = tmp_path / "full", tmp_path / "frozen", tmp_path / "resumed"
    run_cli(["pretrain", *COMMON, f"run.dir={full}"], llmhpc_cache)
    run_cli(["pretrain", *COMMON, FREEZE, f"run.dir={frozen}"], llmhpc_cache)

    step_dir = latest_checkpoint(frozen / "checkpoints")
    meta = read_meta(step_dir)
    component = meta["components"]["model"]
    assert component["base"] == {"source": "init", "seed": 1234}
    assert "tok_embeddings.weight" in component["frozen"] and "layers.0.attention.wq.weight" in component["frozen"]
    assert not any(name.startswith("layers.1.") for name in component["frozen"])

    # On disk: 3 copies (weight, two AdamW moments) of the trained part only, plus DCP's bookkeeping.
    model, _ = load_pretrained(frozen)
    trained = sum(p.numel() * 4 for n, p in model.named_parameters() if n not in component["frozen"])
    frozen_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n in component["frozen"])
    assert 3 * trained <= _tensor_bytes(step_dir) < 3 * trained + 256 * 1024
    assert _tensor_bytes(latest_checkpoint(full / "checkpoints")) - _tensor_bytes(step_dir) >= 3 * frozen_bytes

    # The frozen half is exactly the seeded init (rebuilt from the seed, not saved); the trained half moved.
    torch.manual_seed(1234)
    init = build_model(model.cfg).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, init[name]) == (name in component["frozen"]), name

    # Stopped after step 2, restarted: bitwise the uninterrupted losses and weights.
    copy_run_stopped_at(frozen, resumed, 2)
    proc = run_cli(["pretrain", *COMMON, FREEZE, f"run.dir={resumed}"], llmhpc_cache)
    assert "resumed from" in proc.stdout and "(step 2)" in proc.stdout
    assert step_losses(resumed) == step_losses(frozen)
    again, _ = load_pretrained(resumed)
    for (name, a), b in zip(again.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
