"""`model.init_from` loads each rank's own shards into the already-sharded model (`llmhpc.models.sharded_load`).

Each layout below builds the model the way `llmhpc.train.builder.build` does with init_from (meta device from
the source's config, `parallelize`, `initialize_sharded`) on real gloo processes, gathers every weight it holds
from its shards and compares it bitwise with the one-process load of the same source: `load_pretrained` for the
HF directory, `load_gguf` (what `load_pretrained` runs for a .gguf file; this small file has no tokenizer in it)
for the GGUF file, and the saved weights themselves for the llmhpc checkpoint.

The shapes are chosen so that the shard boundaries fall where a loader could go wrong: the vocabulary (250) splits
unevenly under FSDP2 (63 / 62 rows, 125 / 62 / 63 under FSDP2 x TP), FSDP2 x TP cuts a 24-row K head in the middle
(llama.cpp's interleaved Q/K rows must be reordered across the cut), and row-wise TP cuts the columns of wo
(96 -> 48) and w2 (160 -> 80) inside a 32-value quantization block. The GGUF file mixes Q8_0, Q4_0, Q4_1, F16
and F32 tensors; the HF directory is a sharded bf16 checkpoint (model.safetensors.index.json) without lm_head.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.distributed.launch import spawn_gloo

MODEL = ["model=tiny", "model.dim=96", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=160", "model.vocab_size=250", "run.device=cpu", "trainer.global_batch_size=8",
         "trainer.micro_batch_size=2"]
UNTIED = ["model.tie_embeddings=false"]
FORMATS = ("hf", "gguf", "checkpoint")
LAYOUTS = {  # world size -> {name: (overrides, untied source)}
    2: {"dp_shard=2": (["parallel.dp_shard=2"], False),
        "tp=2": (["parallel.tp=2", "parallel.dp_shard=1"], False),
        "pp=2": (["parallel.pp=2", "parallel.dp_shard=1", *UNTIED], True)},
    4: {"dp_shard=2 x tp=2": (["parallel.dp_shard=2", "parallel.tp=2"], False),
        "pp=2 x dp_shard=2": (["parallel.pp=2", "parallel.dp_shard=2", *UNTIED], True)},
}
_GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def _gguf_name_and_type(name: str):
    from gguf import GGMLQuantizationType as Q

    top = {"tok_embeddings.weight": ("token_embd.weight", Q.Q8_0), "norm.weight": ("output_norm.weight", Q.F32),
           "output.weight": ("output.weight", Q.F16)}
    if name in top:
        return top[name]
    _, index, *module, _ = name.split(".")
    module = ".".join(module)
    kinds = {"attention.wq": Q.Q4_0, "attention.wk": Q.Q4_1, "attention.wv": Q.Q8_0, "attention.wo": Q.Q4_0,
             "feed_forward.w1": Q.Q4_1, "feed_forward.w2": Q.Q4_0, "feed_forward.w3": Q.Q8_0}
    return f"blk.{index}.{_GGUF_NAMES[module]}.weight", kinds.get(module, Q.F32)


def write_gguf(model, path: Path) -> None:
    """A llama GGUF file of `model`'s weights (block weights quantized), written with the gguf library."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    cfg = model.cfg
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    for name, tensor in model.state_dict().items():
        gguf_name, qtype = _gguf_name_and_type(name)
        values = tensor.numpy()
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, values.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name, values.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_sharded_hf(model, directory: Path) -> None:
    """An HF directory in bf16 whose weights are split over two safetensors files plus the index."""
    from llmhpc.models.hf import save_hf

    save_hf(model, directory, dtype=torch.bfloat16)
    single = directory / "model.safetensors"
    tensors = load_file(str(single))
    single.unlink()
    names = sorted(tensors)
    weight_map = {}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_sources(root: Path) -> None:
    """Per tie mode: the three source formats and, next to each, the one-process reference weights."""
    from llmhpc.checkpoint import CheckpointManager, Component
    from llmhpc.config import load_config, to_yaml
    from llmhpc.models import build_model, load_pretrained
    from llmhpc.models.gguf import load_gguf

    for untied in (False, True):
        cfg = load_config("pretrain", [*MODEL, *(UNTIED if untied else [])])
        torch.manual_seed(1 + untied)
        model = build_model(cfg.model)
        with torch.no_grad():  # norms away from 1.0 so that a missing or misplaced norm weight shows
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
        folder = root / ("untied" if untied else "tied")
        write_sharded_hf(model, folder / "hf")
        write_gguf(model, folder / "model.gguf")
        component = Component("model", model, torch.optim.SGD(model.parameters(), lr=0.1))
        CheckpointManager(folder / "run").save(1, [component], {}, to_yaml(cfg))
        references = {"hf": load_pretrained(folder / "hf")[0].state_dict(),
                      "gguf": load_gguf(folder / "model.gguf").state_dict(), "checkpoint": model.state_dict()}
        for fmt, state in references.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"reference-{fmt}.safetensors"))


def source_path(root: Path, untied: bool, fmt: str) -> Path:
    folder = root / ("untied" if untied else "tied")
    return {"hf": folder / "hf", "gguf": folder / "model.gguf", "checkpoint": folder / "run"}[fmt]


def _load_layout(root: Path, world: int, extra: list[str], untied: bool, fmt: str) -> dict[str, object]:
    from torch.distributed.tensor import DTensor

    from llmhpc.config import load_config
    from llmhpc.models.llama import rope_tables
    from llmhpc.parallel import parallelize
    from llmhpc.parallel.dims import validate_layout
    from llmhpc.train.builder import build_model_for, initialize_sharded

    path = source_path(root, untied, fmt)
    cfg = load_config("pretrain", [*MODEL, *extra, f"model.init_from={path}"])
    dims = validate_layout(cfg.parallel, world, cfg.model, cfg.trainer)
    model, lineage = build_model_for(cfg, torch.device("meta"))  # as `_train` does with init_from
    parts = parallelize(model, dims, dims.build_mesh("cpu"), cfg.parallel)
    lineage.update(initialize_sharded(model, parts, cfg, torch.device("cpu")))
    reference = load_file(str(root / ("untied" if untied else "tied") / f"reference-{fmt}.safetensors"))
    held, mismatched, local_bytes = [], [], 0
    for fqn, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        local = param.to_local() if isinstance(param, DTensor) else param
        local_bytes += local.numel() * local.element_size()
        held.append(fqn)
        if not torch.equal(full, reference[fqn]):
            mismatched.append(fqn)
    cos, sin = rope_tables(model.cfg)
    rope_ok = all(torch.equal(p.rope_cos, cos) and torch.equal(p.rope_sin, sin) for p in parts)
    return {"held": held, "mismatched": mismatched, "rope_ok": rope_ok, "local_bytes": local_bytes,
            "model_bytes": sum(t.numel() * t.element_size() for t in reference.values()),
            "reference_names": sorted(reference), "lineage": lineage, "path": str(path)}


def scenarios(root: Path, world: int) -> dict:
    return {f"{layout} {fmt}": functools.partial(_load_layout, root, world, extra, untied, fmt)
            for layout, (extra, untied) in LAYOUTS[world].items() for fmt in FORMATS}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded_load_sources")
    write_sources(root)
    return root


@pytest.fixture(scope="module")
def reports(sources, tmp_path_factory) -> dict[int, list[dict]]:
    return {world: spawn_gloo(world, functools.partial(scenarios, sources), tmp_path_factory.mktemp(f"world{world}"))
            for world in LAYOUTS}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("world,layout", [(w, name) for w, layouts in LAYOUTS.items() for name in layouts])
def test_each_rank_loads_exactly_its_shards(reports, world, layout, fmt):
    results = [report[f"{layout} {fmt}"] for report in reports[world]]
    for rank, result in enumerate(results):
        assert "error" not in result, result["error"]
        assert result["held"] and result["mismatched"] == [], (rank, result["mismatched"])
        assert result["rope_ok"], rank
        assert result["lineage"]["init_from"] == result["path"] and result["lineage"]["format"] == fmt, result
        # only this rank's shards were materialized: at most about half of the model (2-way sharded at least)
        assert result["local_bytes"] <= 0.6 * result["model_bytes"], (rank, result["local_bytes"])
    # together the ranks hold every weight (pipeline stages each hold their own part)
    assert sorted({name for result in results for name in result["held"]}) == results[0]["reference_names"]


def test_the_gguf_reference_is_the_written_model(sources):
    """The GGUF reference itself is sound: dequantized weights within quantization error of the written model
    (Q/K rows were not permuted on writing, so compare them head by head in llama.cpp's order)."""
    from llmhpc.models.gguf import unpermute_qk

    written = load_file(str(sources / "tied" / "reference-checkpoint.safetensors"))
    loaded = load_file(str(sources / "tied" / "reference-gguf.safetensors"))
    for name, weight in written.items():
        if name.endswith("attention.wq.weight"):
            weight = unpermute_qk(weight, 4)
        elif name.endswith("attention.wk.weight"):
            weight = unpermute_qk(weight, 2)
        error = float((loaded[name] - weight).abs().max())
        assert error <= 0.2 * float(weight.abs().max()), (name, error)


def test_model_config_of_reads_the_source_shape(sources):
    from llmhpc.models import load_pretrained
    from llmhpc.models.gguf import load_gguf
    from llmhpc.models.sharded_load import model_config_of

    tied = sources / "tied"
    assert model_config_of(tied / "hf") == load_pretrained(tied / "hf")[0].cfg
    assert model_config_of(tied / "model.gguf") == load_gguf(tied / "model.gguf").cfg
    ckpt = model_config_of(tied / "run")
    assert (ckpt.dim, ckpt.vocab_size, ckpt.tie_embeddings) == (96, 250, True)


def test_pickle_weights_are_refused(tmp_path, sources):
    from llmhpc.errors import InputError
    from llmhpc.models import build_model
    from llmhpc.models.sharded_load import load_into, model_config_of

    (tmp_path / "config.json").write_text((sources / "tied" / "hf" / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle"):
        model_config_of(tmp_path / "pytorch_model.bin")
    model = build_model(model_config_of(tmp_path), device="meta")  # config.json alone is fine
    model.to_empty(device="cpu")
    with pytest.raises(InputError, match="pickle"):
        load_into(model, tmp_path)
