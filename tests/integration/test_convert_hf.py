"""`llmhpc convert to=hf`: transformers loads what we write and computes our logits.

The reference is transformers' own `LlamaForCausalLM` (eager attention, fp32) reading the converted directory;
ours is `load_pretrained` of the source. Sources: llmhpc checkpoints of random small models (tied / untied,
GQA, Llama-3 RoPE scaling, sharded output), a real run sharded under tp=2 x pp=2, and the real SmolLM2 GGUF.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llmhpc.assets import smollm2_gguf
from llmhpc.checkpoint import CheckpointManager, Component, latest_checkpoint
from llmhpc.cli import main
from llmhpc.config import load_config
from llmhpc.config.load import to_yaml
from llmhpc.models import build_model, load_pretrained
from llmhpc.models.hf import state_dict_to_hf
from tests.conftest import one_line_error, run_cli

TOL = 1e-4
# init_std 0.15: logits O(1-10), so a layout error cannot hide
SMALL = [
    "model.vocab_size=320",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.ffn_dim=96",
    "model.max_seq_len=128",
    "model.init_std=0.15",
    "trainer.seq_len=64",
]
MODELS = {
    "untied_gqa_llama3": [
        "model.n_kv_heads=2",
        "model.tie_embeddings=false",
        "model.rope_theta=500000",
        "model.rope_scaling.type=llama3",
        "model.rope_scaling.factor=4.0",
        "model.rope_scaling.original_max_position_embeddings=32",
    ],
    "tied_mha": ["model.n_kv_heads=4", "model.tie_embeddings=true"],
}


def _checkpoint(run_dir, overrides: list[str], seed: int = 0):
    """A random small model saved by the CheckpointManager as a training run saves it (step 1)."""
    cfg = load_config("pretrain", [*SMALL, *overrides, f"run.dir={run_dir}"], check_layout=False)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return CheckpointManager(run_dir).save(1, [Component("model", model, optimizer)], {}, to_yaml(cfg))


def _transformers(directory, attention: str = "eager") -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attention)
    return model.eval()


def _same_logits(ours, theirs: LlamaForCausalLM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= TOL
    return diff


def _same_weights(ours, theirs: LlamaForCausalLM) -> None:
    """Every weight arrived exactly (nothing randomly initialized by transformers behind our back)."""
    reference = theirs.state_dict()
    for name, value in state_dict_to_hf(ours.state_dict()).items():
        assert torch.equal(reference[name], value), name



def _siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name and path.name in p.name)


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_round_trip(name, tmp_path, llmhpc_cache):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, MODELS[name])
    dst = tmp_path / "hf"
    sharded = name == "untied_gqa_llama3"
    proc = run_cli(
        ["convert", f"src={run_dir}", "to=hf", f"dst={dst}", *(["shard_size_gb=0.00005"] if sharded else [])],
        llmhpc_cache,
    )
    assert f"wrote {dst} (hf)" in proc.stdout and "dtype float32, quant none" in proc.stdout

    ours, _ = load_pretrained(run_dir)
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is ours.cfg.tie_embeddings
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # the run's SmolLM2 tokenizer
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == 2
    lineage = json.loads((dst / "lineage.json").read_text())
    assert lineage["source"]["step"] == 1 and lineage["source"]["format"] == "checkpoint"
    if sharded:  # 50 kB shards: an index that transformers follows
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in dst.glob("model-*.safetensors"))
        assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert sorted(set(index["weight_map"].values())) == shards and not (dst / "model.safetensors").exists()
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())
        assert config["rope_scaling"]["rope_type"] == "llama3"
    else:
        assert (dst / "model.safetensors").is_file() and not list(dst.glob("model-*"))

    theirs = _transformers(dst)
    _same_weights(ours, theirs)
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) is ours.cfg.tie_embeddings
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    print(f"{name}: max abs logit diff {_same_logits(ours, theirs, ids):.2g}")


def test_tp2_pp2_run_converts_to_its_weights(tmp_path, llmhpc_cache, tp2_pp2_checkpoint):
    dst = tmp_path / "hf"
    run_cli(["convert", f"src={tp2_pp2_checkpoint}", "to=hf", f"dst={dst}"], llmhpc_cache)
    ours, tokenizer = load_pretrained(tp2_pp2_checkpoint)
    theirs = _transformers(dst)
    _same_weights(ours, theirs)
    ids = torch.tensor([tokenizer("To be, or not to be, that is the question.")["input_ids"]])
    print(f"tp2 x pp2 run: max abs logit diff {_same_logits(ours, theirs, ids):.2g}")
    lineage = json.loads((dst / "lineage.json").read_text())["source"]
    assert lineage["step"] == 2
    assert lineage["source"] == str(latest_checkpoint(tp2_pp2_checkpoint / "checkpoints").resolve())


def test_smollm2_gguf_converts_with_tokenizer_and_chat_template(tmp_path, llmhpc_cache):
    dst = tmp_path / "smollm2-hf"
    run_cli(["convert", f"src={smollm2_gguf()}", "to=hf", f"dst={dst}"], llmhpc_cache)
    ours, our_tokenizer = load_pretrained(smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert "chat_template" in json.loads((dst / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == our_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith("<|im_start|>assistant")
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert ids.tolist() == [our_tokenizer(text)["input_ids"]]
    config = json.loads((dst / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id == 2 and config["tie_word_embeddings"] is True
    # SDPA attention as ours: over 30 layers eager attention alone differs by ~8e-5 in fp32 (1e-4 is too close);
    # every other part of the forward is transformers' own code, and the weights must be equal bit for bit.
    theirs = _transformers(dst, attention="sdpa")
    _same_weights(ours, theirs)
    print(f"SmolLM2 GGUF -> hf: max abs logit diff {_same_logits(ours, theirs, ids):.2g}")


def test_bad_inputs_fail_in_one_line_and_leave_nothing(tmp_path, llmhpc_cache, capsys):
    run_dir = tmp_path / "run"
    step_dir = _checkpoint(run_dir, MODELS["tied_mha"])
    dst = tmp_path / "out"
    assert main(["convert", f"src={run_dir}", f"dst={dst}"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    # An existing dst is refused without overwrite, and left as it was.
    one_line_error(capsys, ["convert", f"src={run_dir}", f"dst={dst}"], str(dst), "overwrite=true")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    # keep_adapters=true on a model without adapters, or for a format that takes the merged model: refused.
    one_line_error(capsys, ["convert", f"src={run_dir}", f"dst={tmp_path / 'new'}", "keep_adapters=true"],
                   "keep_adapters", "peft=none")
    one_line_error(capsys, ["convert", f"src={dst}", f"dst={tmp_path / 'new'}", "keep_adapters=true"],
                   "keep_adapters", "hf model without adapters")
    one_line_error(capsys, ["convert", f"src={run_dir}", "to=gguf", f"dst={tmp_path / 'new.gguf'}",
                            "keep_adapters=true"], "keep_adapters", "to=hf")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.gguf").exists()
    # A missing source: nothing is created.
    one_line_error(capsys, ["convert", f"src={tmp_path / 'nope'}", f"dst={tmp_path / 'new'}"], str(tmp_path / "nope"))
    assert not (tmp_path / "new").exists()

    # overwrite=true replaces dst (here with bf16 weights).
    assert main(["convert", f"src={run_dir}", f"dst={dst}", "overwrite=true", "dtype=bfloat16"]) == 0
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (dst / "model.safetensors").stat().st_size < len(before["model.safetensors"]) * 0.6
    replaced = {p.name: p.read_bytes() for p in dst.iterdir()}
    # An HF source keeps its 16-bit dtype under dtype=auto: hf -> hf is then the identity on the weights file.
    assert main(["convert", f"src={dst}", f"dst={tmp_path / 'again'}"]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == replaced["model.safetensors"]

    # A truncated shard that meta.json still vouches for fails while tensors are being written: the partial
    # output is removed and the existing dst (overwrite=true) is kept.
    shard = next(step_dir.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["files"][shard.name] = shard.stat().st_size
    (step_dir / "meta.json").write_text(json.dumps(meta))
    one_line_error(capsys, ["convert", f"src={run_dir}", f"dst={dst}", "overwrite=true"], str(step_dir))
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == replaced and _siblings(dst) == []
    # A truncated shard that meta.json's sizes catch fails before anything is written.
    meta["files"][shard.name] += 1
    (step_dir / "meta.json").write_text(json.dumps(meta))
    one_line_error(capsys, ["convert", f"src={run_dir}", f"dst={tmp_path / 'fresh'}"], str(step_dir), "corrupt")
    assert not (tmp_path / "fresh").exists() and _siblings(tmp_path / "fresh") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
