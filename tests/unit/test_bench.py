"""`llmhpc bench` runs end to end, its equal-loss check can fail, and the fused LM-head loss is exact.

No timing is asserted: these check that the numbers the benchmark compares are the right ones.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from llmhpc.config import load_config
from llmhpc.metrics.kernel_floor import KernelFloor
from llmhpc.models import build_model
from llmhpc.stages import bench
from llmhpc.stages.registry import STAGES, load_stage_config, with_defaults
from llmhpc.train import losses
from llmhpc.train.losses import IGNORE_INDEX, linear_cross_entropy_sum, token_cross_entropy_sum
from llmhpc.train.objective import causal_lm_loss

TINY = ["model=tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=192", "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.max_steps=2",
        "parallel.compile=false"]


def _labels(n: int, vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = IGNORE_INDEX
    labels[-3:] = IGNORE_INDEX  # a whole chunk tail ignored
    return labels


class _OpShapes(TorchDispatchMode):
    """Records (aten op name, shapes of its first three tensor arguments) of every op run under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)][:3]
        self.calls.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_fused_loss_matches_cross_entropy_value_and_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(50, 24, requires_grad=True)
    weight = torch.randn(97, 24, requires_grad=True)
    labels = _labels(50, 97)
    fused, n_fused = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=chunk)
    (0.3 * fused).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain, n_plain = token_cross_entropy_sum(hidden @ weight.t(), labels)
    (0.3 * plain).backward()
    assert n_fused == n_plain == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the eval path (no gradients computed) gives the same value
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, labels, chunk)[0], plain)


def test_fused_loss_runs_the_head_on_labelled_rows_only():
    """An SFT batch's prompt and padding rows carry no loss: no vocabulary-sized matmul runs over them."""
    torch.manual_seed(2)
    hidden = torch.randn(60, 24, requires_grad=True)
    weight = torch.randn(97, 24, requires_grad=True)
    labels = torch.full((60,), IGNORE_INDEX)
    labels[40:52] = torch.randint(0, 97, (12,))  # one answer of 12 tokens in a 60-position row
    with _OpShapes() as ops:
        loss, count = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=4096)
        loss.backward()
    head_rows = [shapes[0][0] for name, shapes in ops.calls if name.startswith("aten.mm") and 97 in shapes[1]]
    assert count == 12 and head_rows and set(head_rows) == {12}, ops.calls
    assert hidden.grad[:40].abs().max() == 0 and hidden.grad[52:].abs().max() == 0
    assert hidden.grad[40:52].abs().max() > 0


def test_fused_loss_under_bf16_autocast_is_close_to_plain():
    torch.manual_seed(1)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (0.2 * torch.randn(120, 32)).requires_grad_()
    labels = _labels(40, 120)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=16)
        plain, _ = token_cross_entropy_sum(torch.nn.functional.linear(hidden, weight), labels)
    assert fused.dtype == torch.float32
    (g_fused,) = torch.autograd.grad(fused, weight)
    (g_plain,) = torch.autograd.grad(plain, weight)
    assert g_fused.dtype == weight.dtype
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g_fused, g_plain, rtol=5e-2, atol=5e-2)


def test_fused_loss_keeps_one_cpu_logits_buffer_and_repeats_only_the_same_backward():
    torch.manual_seed(4)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = _labels(30, 50)
    first, _ = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=8)
    (buffer,) = losses._cpu_logits_buffers.values()
    second, _ = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=8)
    (again,) = losses._cpu_logits_buffers.values()
    assert again.data_ptr() == buffer.data_ptr() and again.shape == (8, 50)  # reused, not page-faulted anew
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    second.backward(retain_graph=True)
    once = hidden.grad.clone()
    # A zero-bubble pipeline schedule runs backward twice (input, then weights) with the same incoming gradient:
    # the second gets the same result; another incoming gradient cannot (the saved ones were scaled in place).
    second.backward(retain_graph=True)
    torch.testing.assert_close(hidden.grad, 2 * once, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="another incoming gradient"):
        (3 * second).backward()


def test_fused_loss_compiles_or_says_once_why_not(monkeypatch):
    """Eager only where inductor cannot build (a warning, once); a failure while compiling is raised, not hidden."""
    torch.manual_seed(5)
    hidden, weight, labels = torch.randn(12, 8), torch.randn(20, 8), _labels(12, 20)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
    monkeypatch.setattr(losses, "_compiled_chunk", None)
    monkeypatch.setattr(losses, "_compile_blocker", lambda device: "no C++ compiler (test)")
    with pytest.warns(UserWarning, match="runs eager.*no C\\+\\+ compiler"):
        first = linear_cross_entropy_sum(hidden.requires_grad_(), weight, labels)[0]
    torch.testing.assert_close(first, expected)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second call is silent
        linear_cross_entropy_sum(hidden, weight, labels)

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor bug (test)")
        return run

    monkeypatch.setattr(losses, "_compiled_chunk", None)
    monkeypatch.setattr(losses, "_compile_blocker", lambda device: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match="inductor bug"):
        linear_cross_entropy_sum(hidden, weight, labels)


def test_fused_loss_compiles_once_for_any_count_of_labelled_rows(monkeypatch):
    """SFT batches label a different number of tokens every step: one kernel serves them all (a recompile per count
    ran into dynamo's recompile limit after 8 steps, and from then on the ~6x slower eager ops)."""
    import torch._dynamo

    torch.manual_seed(6)
    weight = torch.randn(40, 8, requires_grad=True)
    monkeypatch.setattr(losses, "_compiled_chunk", None)
    torch._dynamo.reset()
    linear_cross_entropy_sum(torch.randn(13, 8, requires_grad=True), weight, _labels(13, 40), chunk_tokens=64)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (17, 22, 29, 35, 41, 50, 57, 61, 63, 64):
            hidden = torch.randn(rows, 8, requires_grad=True)
            labels = _labels(rows, 40)
            loss, _ = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=64)
            expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX,
                                                         reduction="sum")
            torch.testing.assert_close(loss, expected)


def test_causal_lm_loss_of_llama_equals_loss_of_its_logits():
    cfg = load_config("bench", TINY).model
    cfg.vocab_size = 300
    torch.manual_seed(2)
    model = build_model(cfg)
    ids = torch.randint(0, 300, (2, 17))
    labels = torch.randint(0, 300, (2, 17))
    labels[0, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    loss, n = causal_lm_loss(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref, n_ref = token_cross_entropy_sum(model(ids), labels)
    ref.backward()
    assert n == n_ref == 29
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_loss_agreement_check_detects_different_weights():
    cfg = load_config("bench", TINY)
    torch.manual_seed(3)
    ours = build_model(cfg.model)
    twin = bench.hf_twin(ours)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33))
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    steps = {
        "ours": bench.ours_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-3), bf16=False),
        "hf": bench.hf_step(twin, torch.optim.AdamW(twin.parameters(), lr=1e-3), bf16=False),
    }
    first = {name: step(batch) for name, step in steps.items()}
    assert abs(first["ours"] - first["hf"]) < 1e-5
    with torch.no_grad():
        twin.model.norm.weight.mul_(1.5)  # a small, plausible conversion bug
    second = {name: step(batch) for name, step in steps.items()}
    assert abs(second["ours"] - second["hf"]) > bench.LOSS_TOL["fp32"]


def test_bench_runs_end_to_end_and_writes_the_table(tmp_path, llmhpc_cache):
    cfg = load_config("bench", [*TINY, f"run.dir={tmp_path / 'run'}"])
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nintro kept\n", encoding="utf-8")
    result = bench.run(cfg, docs_path=docs, references=("hf_eager",))
    assert result["equal_loss"], result
    assert len(result["losses"]["ours"]) == bench.WARMUP_STEPS + 2
    assert result["max_loss_diff_vs_hf_eager"] < 1e-4
    assert result["impl"]["ours"]["tokens_per_s"] > 0 and result["gemm_peak_flops"] > 0
    assert "shakespeare" in result["data"]
    assert result["kernel_floor"]["median_step_s"] > 0 and result["impl"]["ours"]["over_floor"] > 0
    saved = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert saved["ratio_vs_hf_eager"] == pytest.approx(result["ratio_vs_hf_eager"])
    bench.run(cfg, docs_path=docs, references=("hf_eager",))  # same key: the row is replaced
    text = docs.read_text()
    assert "intro kept" in text
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and "| tiny | 2x32 |" in rows[0] and "| — |" in rows[0]


def test_user_overrides_replace_only_their_own_defaults():
    spec = STAGES["bench"]
    merged = with_defaults(spec, ["precision=bf16", "model=tiny"])
    assert "model=smollm2_135m" not in merged and merged[-2:] == ["precision=bf16", "model=tiny"]
    assert "trainer.seq_len=256" in merged
    assert load_stage_config("bench", []).model.n_layers == 30


def test_kernel_floor_does_exactly_the_matmul_and_attention_work_of_a_train_step():
    cfg = load_config("bench", [*TINY, "model.tie_embeddings=false"]).model
    model = build_model(cfg)
    batch, seq = 2, 16
    floor = KernelFloor(model, batch, seq, torch.float32)
    with FlopCounterMode(display=False) as matmuls:
        floor._matmuls()
    matmul_params = model.num_params(exclude_embeddings=True) - sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert matmuls.get_total_flops() == 6 * matmul_params * batch * seq
    with _OpShapes() as attention:  # the same SDPA kernel and shapes as the model's layers, once per layer
        floor._attention()
    hd = cfg.dim // cfg.n_heads
    q, kv = [batch, cfg.n_heads, seq, hd], [batch, cfg.n_kv_heads, seq, hd]
    forward = [shapes for name, shapes in attention.calls if "attention" in name and "backward" not in name]
    backward = [name for name, _ in attention.calls if "attention" in name and "backward" in name]
    assert forward == [[q, kv, kv]] * cfg.n_layers and len(backward) == cfg.n_layers
    times = floor.measure()
    assert min(times.matmul_s, times.attention_s, times.optimizer_s) > 0
    assert times.total_s == pytest.approx(times.matmul_s + times.attention_s + times.optimizer_s)

