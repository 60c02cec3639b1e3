"""Shared test helpers: run the real CLI in a subprocess, with a per-session data cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A CPU-quick model on the real Shakespeare corpus; steps take a fraction of a second on 2 cores.
SMALL_RUN = [
    "model=tiny",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=192",
    "trainer.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8",
    "trainer.warmup_steps=2",
    "trainer.lr=3e-3",
    "trainer.eval_every=0",
    "logger.progress_bar=false",
    "run.device=cpu",
]


def marking_slow(names, slow) -> list:
    """Parameters `names` for pytest.mark.parametrize, those in `slow` marked for the slow tier (`-m slow`)."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


@pytest.fixture(scope="session")
def llmhpc_cache(tmp_path_factory) -> Path:
    """One LLMHPC_CACHE for the session so the corpus and tokenizer are prepared once."""
    path = Path(os.environ.get("LLMHPC_TEST_CACHE") or tmp_path_factory.mktemp("llmhpc_cache"))
    os.environ["LLMHPC_CACHE"] = str(path)
    return path


def cli_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, LLMHPC_CACHE=str(cache), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env["WANDB_SILENT"] = "true"
    env["WANDB_DISABLE_GIT"] = "true"
    return env


def run_cli(args: list[str], cache: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m llmhpc ARGS` in a fresh process; returns the completed process."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmhpc", *args],
        cwd=REPO,
        env=cli_env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"llmhpc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def one_line_error(capsys, argv: list[str], *mentions: str) -> None:
    """The real CLI entry point refuses `argv`: exit code != 0, one `error:` line naming each of `mentions`."""
    from llmhpc.cli import main

    assert main(argv) != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "tensor/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in mentions:
        assert text in lines[0], lines


def peak_rss_mib(nproc: int, args: list[str], cache: Path, out_dir: Path, threads: int | None = None) -> float:
    """Run `llmhpc ARGS` on `nproc` processes (torchrun when > 1); the largest peak RSS of its ranks, in MiB."""
    out_dir.mkdir(parents=True)
    env = cli_env(cache)
    env["PEAK_RSS_DIR"] = str(out_dir)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([*launcher, str(REPO / "tests" / "peak_rss.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    peaks = [int(f.read_text()) for f in out_dir.iterdir()]
    assert len(peaks) == nproc, proc.stdout
    return max(peaks) / 1024


@pytest.fixture(scope="session")
def tp2_pp2_checkpoint(tmp_path_factory, llmhpc_cache) -> Path:
    """A run trained 2 steps under tp=2 x pp=2 (4 gloo processes): its checkpoint is sharded both ways.

    The SMALL_RUN model: tied embeddings, grouped-query attention (4 heads, 2 KV heads), 2 blocks (one per stage).
    """
    run_dir = tmp_path_factory.mktemp("tp2_pp2_run")
    env = cli_env(llmhpc_cache)
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "llmhpc",
               "pretrain", *SMALL_RUN, "parallel.tp=2", "parallel.pp=2", "trainer.max_steps=2",
               f"run.dir={run_dir}"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """24 arithmetic preference pairs (a right worked answer over a flawed one) as JSONL, for DPO runs."""
    from llmhpc.data.arithmetic import train_eval_split
    from llmhpc.data.arithmetic_preferences import preference_rows

    path = tmp_path_factory.mktemp("dpo_data") / "pairs.jsonl"
    rows = preference_rows(train_eval_split(24, 0, seed=5)[0], seed=5)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
