"""precision=fp8: refused at launch without FP8 tensor cores; the float8 conversion itself trains.

FP8 matmuls are only fast (and only meant to run) on H100-class GPUs, so the CLI stops on CPU with one
line before touching data or model. torchao can still emulate float8 on CPU, which lets these tests check
the conversion our GPU runs use: which modules become float8, and that a float8 model trains like the
bf16 one (losses within the precision gap) in both scaling recipes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.models import build_model
from tests.conftest import REPO

pytest.importorskip("torchao.float8", reason="torchao is installed with the [dev] extra")

MODEL = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=256, max_seq_len=64,
                    tie_embeddings=False)


def test_fp8_on_cpu_fails_fast_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "llmhpc", "pretrain", "precision=fp8", "run.device=cpu", f"run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FP8 tensor cores" in lines[0] and "precision=bf16" in lines[0], proc.stderr
    assert not run_dir.exists(), "nothing may be written before the device check"


def train_losses(model: torch.nn.Module, steps: int = 5) -> list[float]:
    torch.manual_seed(1)
    batch = torch.randint(0, MODEL.vocab_size, (4, 33))  # one batch, memorized: the loss must fall
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_conversion_trains_like_bf16(recipe):
    from torchao.float8.float8_linear import Float8Linear

    from llmhpc.parallel.float8 import apply_float8

    torch.manual_seed(0)
    reference = build_model(MODEL, device=torch.device("cpu"))
    model = build_model(MODEL, device=torch.device("cpu"))
    model.load_state_dict(reference.state_dict())
    assert apply_float8(model, recipe, fsdp=False) is None  # no FSDP: nothing to do after a step
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    linears = {name for name, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    assert converted == {name for name in linears if name.startswith("layers.")}  # every block linear, no head
    assert len(converted) == 2 * 7

    bf16, fp8 = train_losses(reference), train_losses(model)
    gap = max(abs(a - b) for a, b in zip(bf16, fp8, strict=True))
    print(f"{recipe}: bf16 losses {[round(x, 4) for x in bf16]}, fp8 {[round(x, 4) for x in fp8]}, max gap {gap:.3e}")
    assert fp8[-1] < fp8[0] - 0.05, "the float8 model must learn"
    assert gap < 0.02 * bf16[0], gap  # e4m3 keeps ~2 significant digits; a broken scale would be far off
    assert gap > 0, "float8 matmuls must actually run (bitwise equal to bf16 means nothing was converted)"


def test_fsdp_tensorwise_returns_the_scale_hook():
    from llmhpc.parallel.float8 import apply_float8

    model = build_model(MODEL, device=torch.device("cpu"))
    hook = apply_float8(model, "tensorwise", fsdp=True)
    assert callable(hook)
    assert apply_float8(build_model(MODEL, device=torch.device("cpu")), "rowwise", fsdp=True) is None


def test_linears_whose_tensor_parallel_shards_do_not_suit_fp8_stay_high_precision():
    from torchao.float8.float8_linear import Float8Linear

    from llmhpc.parallel.float8 import apply_float8

    model = build_model(MODEL, device=torch.device("cpu"))
    apply_float8(model, "tensorwise", fsdp=False, tp=4)  # wk / wv: 2 KV heads x 16 = 32 outputs, 8 per rank
    converted = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {"wq", "wo", "w1", "w2", "w3"}
