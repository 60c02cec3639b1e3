"""Bad input files end the real CLI with one line `error: <path>...: <problem>; <fix>`, never a traceback.

Each case writes one broken input (corpus, model weights, config) and runs `llmhpc pretrain` on it in a
subprocess. Every case fails while reading its input, before any model is trained, so no run directory
gets metrics. The expected path and byte offset are computed here from the bytes the test wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmhpc.assets import smollm2_gguf
from llmhpc.config.schema import ModelConfig
from llmhpc.models.hf import config_to_hf
from tests.conftest import SMALL_RUN, run_cli

TINY = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32)


def _hf_dir(root: Path, weights: bytes | None = None, config: str | None = None) -> Path:
    """A directory shaped like a Hugging Face model: config.json (+ model.safetensors when weights given)."""
    root.mkdir()
    (root / "config.json").write_text(config if config is not None else json.dumps(config_to_hf(TINY)))
    if weights is not None:
        (root / "model.safetensors").write_bytes(weights)
    return root


def _safetensors_bytes(tmp: Path) -> bytes:
    save_file({"model.norm.weight": torch.ones(16)}, str(tmp / "w.safetensors"))
    return (tmp / "w.safetensors").read_bytes()


# Each case: (tmp) -> (overrides, strings the error line must contain). The first string is the path.
def empty_corpus(tmp: Path):
    (tmp / "empty.txt").write_text("")
    return [f"data.source={tmp / 'empty.txt'}"], [str(tmp / "empty.txt"), "no non-empty documents", "data.source"]


def malformed_jsonl_line(tmp: Path):
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "unquoted" oops}\n')
    return [f"data.source={tmp / 'bad.jsonl'}"], [f"{tmp / 'bad.jsonl'}, line 2:", "invalid JSON"]


def jsonl_without_text_field(tmp: Path):
    (tmp / "body.jsonl").write_text('{"body": "the text is under another key"}\n')
    return [f"data.source={tmp / 'body.jsonl'}"], [f"{tmp / 'body.jsonl'}, line 1:", "'text'", "data.text_field"]


def non_utf8_text(tmp: Path):
    head = "Ophelia: ’tis in my memory lock’d.\n".encode()
    (tmp / "latin1.txt").write_bytes(head + "Laertes: adieu, très cher\n".encode("latin-1"))
    offset = len(head) + len("Laertes: adieu, tr")  # the latin-1 byte of 'è'
    return [f"data.source={tmp / 'latin1.txt'}"], [f"{tmp / 'latin1.txt'}: byte {offset} ", "UTF-8"]


def missing_source(tmp: Path):
    return [f"data.source={tmp / 'nowhere.jsonl'}"], [str(tmp / "nowhere.jsonl"), "data.source"]


def pickle_next_to_config(tmp: Path):
    model = _hf_dir(tmp / "hf")
    torch.save({"model.norm.weight": torch.ones(16)}, model / "model.pt")
    return [f"model.init_from={model}"], [str(model / "model.pt"), "pickle", "safetensors"]


def pickle_alone(tmp: Path):
    torch.save({"model.norm.weight": torch.ones(16)}, tmp / "model.pt")
    return [f"model.init_from={tmp / 'model.pt'}"], [str(tmp / "model.pt"), "pickle", "safetensors"]


def truncated_gguf(tmp: Path):
    with open(smollm2_gguf(), "rb") as f:
        (tmp / "cut.gguf").write_bytes(f.read(200_000))  # an interrupted download: header, no tensor data
    return [f"model.init_from={tmp / 'cut.gguf'}"], [str(tmp / "cut.gguf"), "GGUF"]


def corrupt_safetensors(tmp: Path):
    model = _hf_dir(tmp / "hf", weights=_safetensors_bytes(tmp)[:-7])
    return [f"model.init_from={model}"], [str(model / "model.safetensors"), "safetensors"]


def config_not_json(tmp: Path):
    model = _hf_dir(tmp / "hf", weights=_safetensors_bytes(tmp), config='{"model_type": "llama",\n  hidden_size: 16}')
    return [f"model.init_from={model}"], [str(model / "config.json"), "line 2", "JSON"]


CASES = [
    empty_corpus, malformed_jsonl_line, jsonl_without_text_field, non_utf8_text, missing_source,
    pickle_next_to_config, pickle_alone, truncated_gguf, corrupt_safetensors, config_not_json,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_error_line(case, tmp_path: Path, llmhpc_cache: Path) -> None:
    tmp = tmp_path.resolve()
    overrides, expected = case(tmp)
    run_dir = tmp / "run"
    proc = run_cli(["pretrain", *SMALL_RUN, "trainer.max_steps=2", f"run.dir={run_dir}", *overrides],
                   llmhpc_cache, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {expected[0]}"), lines[0]
    for text in expected[1:]:
        assert text in lines[0], lines[0]
    assert "; " in lines[0]  # the fix follows the problem
    assert not (run_dir / "metrics.jsonl").exists()
