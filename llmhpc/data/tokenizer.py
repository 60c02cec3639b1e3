"""Load the tokenizer named by `data.tokenizer` (with its chat template) quickly and offline.

Building a fast tokenizer from a GGUF's embedded vocabulary takes seconds, and every stage, test
and worker process needs it, so the result is saved once as a tokenizer directory under
$LLMHPC_CACHE (default ~/.cache/llmhpc), keyed by the GGUF's name, size and mtime.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llmhpc.assets import cache_root, smollm2_gguf
from llmhpc.errors import InputError

SEPARATOR_TOKEN = "<|endoftext|>"
ACCEPTED = "expected 'smollm2', a .gguf file or a Hugging Face tokenizer directory"


_GENERIC_FAST = ("PreTrainedTokenizerFast", "TokenizersBackend")
"""tokenizer_class values that mean "tokenizer.json as it is": no model-specific class, so no model config."""


def _loader(path: Path, kwargs: dict):
    """The class to load with: the generic fast tokenizer when the directory's tokenizer_config.json names it
    (what our exports and the GGUF cache write), else AutoTokenizer. AutoTokenizer first reads the model's config
    to pick a class, and the imports that takes cost ~2 s in every process that loads a tokenizer."""
    config = path / "tokenizer_config.json"
    if "gguf_file" not in kwargs and config.is_file():
        try:
            named = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            named = None  # AutoTokenizer reports a damaged file
        if named in _GENERIC_FAST and (path / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast
    return AutoTokenizer


def _load(path: Path, **kwargs) -> PreTrainedTokenizerBase:
    """Load a tokenizer (`_loader`), with a failure to read the files turned into a one-line InputError."""
    target = path / kwargs["gguf_file"] if "gguf_file" in kwargs else path
    try:
        return _loader(path, kwargs).from_pretrained(str(path), **kwargs)
    except ImportError:
        raise
    except Exception as e:  # a parse failure of any kind: the files are damaged or not a tokenizer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(
            f"{target}: cannot load a tokenizer from it ({reason}); set data.tokenizer to 'smollm2', "
            "a readable .gguf file or a directory with tokenizer.json"
        ) from None


def _gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    return cache_root() / "tokenizers" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _from_gguf(gguf_path: Path) -> PreTrainedTokenizerBase:
    cached = _gguf_cache_dir(gguf_path)
    if (cached / "tokenizer.json").is_file():
        return _load(cached)
    tokenizer = _load(gguf_path.parent, gguf_file=gguf_path.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".tmp-", dir=cached.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by the user's jobs
        os.rename(tmp, cached)  # atomic: readers see a complete directory or none
    except OSError:
        pass  # another process won the race (or the cache is read-only): use what we built
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """'smollm2', a .gguf file, or a Hugging Face tokenizer directory -> fast tokenizer."""
    if spec == "smollm2":
        return _from_gguf(smollm2_gguf())
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer not found; {ACCEPTED} (data.tokenizer)")
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path.resolve())
    if path.is_dir():
        return _load(path)
    raise InputError(f"{path}: not a usable tokenizer; {ACCEPTED} (data.tokenizer)")


def document_separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Token placed between documents in packed pretraining data: <|endoftext|>, else EOS."""
    token_id = tokenizer.get_vocab().get(SEPARATOR_TOKEN)
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise InputError(
            f"{getattr(tokenizer, 'name_or_path', None) or 'tokenizer'}: has neither {SEPARATOR_TOKEN} nor an "
            "eos token to separate documents; use a tokenizer that defines an eos token"
        )
    return int(token_id)
