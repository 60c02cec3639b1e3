"""Every command README.md shows runs as written (shortened to one optimizer step), so the README cannot drift.

Commands are read from the README itself: each `llmhpc ...` / `torchrun ... -m llmhpc ...` line of its bash
blocks (continuation lines joined, comments dropped) runs with `trainer.max_steps=1` and its `run.dir` moved
into a temporary directory; each `$ llmhpc ...` line of a plain block must print exactly the `error: ...` line
the README shows under it, with a non-zero exit code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

README = (REPO / "README.md").read_text(encoding="utf-8")
SHORT = ["trainer.max_steps=1", "trainer.eval_every=0", "logger.progress_bar=false"]
SKIP = ("bash tools/install.sh", "python -m pytest")
"""Set-up lines of the README: CI runs exactly these itself."""


def _blocks(language: str) -> list[str]:
    """The README's fenced blocks opened with ```<language> (language "" for plain ones)."""
    blocks, current, opened = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if opened is None:
                opened, current = line[3:].strip(), []
            else:
                if opened == language:
                    blocks.append("\n".join(current) + "\n")
                opened = None
        elif opened is not None:
            current.append(line)
    return blocks


def readme_commands() -> list[str]:
    """Each llmhpc / torchrun command of the README's bash blocks, one line each."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#")[0].split("&&"):
                part = " ".join(part.split())
                if part.startswith(("llmhpc ", "torchrun ")) and not part.startswith(SKIP):
                    commands.append(part)
    return commands


def readme_errors() -> list[tuple[str, str]]:
    """(command, the error line the README shows for it) from the plain blocks' `$ llmhpc ...` lines."""
    pairs = []
    for block in _blocks(""):
        lines = block.splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.startswith("$ llmhpc "):
                pairs.append((line[2:], lines[i + 1]))
    return pairs


def _argv(command: str, run_dir: Path) -> list[str]:
    words = [w if not w.startswith("run.dir=") else f"run.dir={run_dir}" for w in command.split()]
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]
    else:
        words = [sys.executable, "-m", "llmhpc", *words[1:]]
    if " pretrain" in command:
        words += SHORT + ([] if any(w.startswith("run.dir=") for w in words) else [f"run.dir={run_dir}"])
    return words


def test_the_readme_shows_commands_of_every_kind() -> None:
    commands = readme_commands()
    assert any(c.startswith("torchrun") for c in commands) and any(" plan " in c for c in commands)
    assert len(readme_errors()) >= 2


@pytest.mark.parametrize("command", [  # multi-process commands are long: the slow tier (CI time; their layouts'
    # parity with one process is tier 1, tests/distributed)
    pytest.param(c, marks=pytest.mark.slow) if "--nproc-per-node" in c else c
    for c in readme_commands()])
def test_readme_command_runs(command: str, tmp_path, llmhpc_cache) -> None:
    env = dict(cli_env(llmhpc_cache), OMP_NUM_THREADS="1")
    proc = subprocess.run(_argv(command, tmp_path / "run"), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-4000:]}"
    if " pretrain" in command:
        assert "done: step 1" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(("command", "expected"), readme_errors())
def test_readme_error_examples_print_what_the_readme_says(command: str, expected: str, llmhpc_cache) -> None:
    proc = subprocess.run([sys.executable, "-m", "llmhpc", *command.split()[1:]], cwd=REPO,
                          env=cli_env(llmhpc_cache), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [expected]
