"""`load_pretrained` never runs code from a file and says plainly what it accepts.

Pickle weights are refused unless the caller opts in; even then `weights_only=True` refuses a
pickle that would execute something.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.errors import InputError
from llmhpc.models import build_model, load_pretrained
from llmhpc.models.hf import config_to_hf, state_dict_to_hf

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=64)


@pytest.fixture()
def pickle_dir(tmp_path):
    """An HF directory whose weights are only in pytorch_model.bin (a pickle)."""
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    torch.save(state_dict_to_hf(model.state_dict()), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(CFG)))
    return tmp_path, model


@pytest.mark.parametrize("target", ["dir", "file"])
def test_pickle_is_refused_by_default(pickle_dir, target):
    directory, _ = pickle_dir
    path = directory if target == "dir" else directory / "pytorch_model.bin"
    with pytest.raises(InputError) as err:
        load_pretrained(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{directory / 'pytorch_model.bin'}: ")
    assert "safetensors" in message and "allow_pickle=True" in message


@pytest.mark.parametrize("target", ["dir", "file"])
def test_pickle_opt_in_loads_the_weights(pickle_dir, target):
    directory, original = pickle_dir
    path = directory if target == "dir" else directory / "pytorch_model.bin"
    model, tokenizer = load_pretrained(path, allow_pickle=True)
    assert tokenizer is None
    ids = torch.randint(0, CFG.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), original(ids))


class _Payload:
    def __reduce__(self):
        return (print, ("code ran from a weight file",))


def test_opt_in_still_refuses_executable_pickles(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(CFG)))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_pretrained(tmp_path, allow_pickle=True)
    assert "code ran" not in capsys.readouterr().out


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_pretrained(missing)


def test_unknown_format_lists_what_is_accepted(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    for path in (tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(InputError) as err:
            load_pretrained(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ")
        assert "Hugging Face directory" in message and ".gguf" in message and "checkpoint" in message


def test_hf_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(CFG)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
