"""`llmhpc convert to=trtllm`: every layout written is read back by an independent reader and compared with the
source's weights (HF names, [out, in], unfused).

The reader below knows only TensorRT-LLM's checkpoint format (config.json + rank{N}.safetensors, N = pp_rank * tp
+ tp_rank; per rank qkv = [q heads; k heads; v heads], KV heads repeated when tp exceeds them; dense / proj split
on their input, fc (= gate_proj) / gate (= up_proj) / lm_head on their output; lm_head zero-padded to a multiple
of tp; layers numbered from 0 on each pipeline stage); it imports nothing from llmhpc.export. Sources are random
transformers `LlamaForCausalLM` models saved by transformers itself, so the reference weights come from
transformers, not from llmhpc; the FP8 activation scales are checked against a transformers forward pass.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmhpc.config import ConfigError
from llmhpc.config.schema import Config, ConvertConfig
from llmhpc.errors import InputError
from llmhpc.stages.convert import convert
from tests.conftest import run_cli

SHAPES = {
    # GQA (4 heads, 2 KV heads) so q and kv split differently; vocab 101 needs padding at tp=2
    "gqa": dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "tied": dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    # sizes TensorRT-LLM's weight-only layers accept at tp=2 (multiples of 128); a byte-level tokenizer for FP8
    "quant": dict(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """{kind: (HF directory, its weights by HF name)}: random models with random norm weights."""
    out = {}
    for seed, (kind, shape) in enumerate(SHAPES.items()):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(
            LlamaConfig(**shape, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        if kind == "quant":
            _byte_tokenizer().save_pretrained(path)
        out[kind] = (path, {k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def _convert(src: Path, dst: Path, **options) -> None:
    convert(Config(stage="convert", convert=ConvertConfig(src=str(src), to="trtllm", dst=str(dst), **options)))


# ---- the independent reader --------------------------------------------------------------------------------


def read_trtllm(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(config.json, weights by HF name as stored — fp8 dequantized to fp32 —, the raw rank dicts)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    assert cfg["mapping"]["world_size"] == tp * pp
    assert sorted(p.name for p in ckpt.glob("rank*.safetensors")) == sorted(
        f"rank{r}.safetensors" for r in range(tp * pp)
    )
    ranks = [load_file(ckpt / f"rank{r}.safetensors") for r in range(tp * pp)]
    n_layers, heads, kv, hd = (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_size"],
    )
    vocab, per_stage = cfg["vocab_size"], n_layers // pp

    def weight(r: int, name: str) -> torch.Tensor:
        w = ranks[r][name + ".weight"]
        if w.dtype == torch.float8_e4m3fn:
            return w.float() * ranks[r][name + ".weights_scaling_factor"]
        return w

    def same(parts: list[torch.Tensor]) -> torch.Tensor:
        assert all(torch.equal(parts[0], x) for x in parts[1:]), "replicated tensor differs between ranks"
        return parts[0]

    hf: dict[str, torch.Tensor] = {}
    hf["model.embed_tokens.weight"] = same([weight(t, "transformer.vocab_embedding") for t in range(tp)])
    for r in range(tp, tp * pp):
        assert "transformer.vocab_embedding.weight" not in ranks[r]
    last = [(pp - 1) * tp + t for t in range(tp)]
    hf["model.norm.weight"] = same([weight(r, "transformer.ln_f") for r in last])
    head = torch.cat([weight(r, "lm_head") for r in last])
    assert head.shape[0] % tp == 0 and head.shape[0] - vocab < tp
    assert not head[vocab:].any(), "vocabulary padding rows must be zero"
    hf["lm_head.weight"] = head[:vocab]
    nq, nkv = heads // tp, max(kv // tp, 1)
    for i in range(n_layers):
        p, j = divmod(i, per_stage)
        rs = [p * tp + t for t in range(tp)]
        pre, out = f"transformer.layers.{j}.", f"model.layers.{i}."
        q, k, v = zip(*[weight(r, pre + "attention.qkv").split([nq * hd, nkv * hd, nkv * hd]) for r in rs], strict=True)
        hf[out + "self_attn.q_proj.weight"] = torch.cat(q)
        if kv >= tp:
            hf[out + "self_attn.k_proj.weight"], hf[out + "self_attn.v_proj.weight"] = torch.cat(k), torch.cat(v)
        else:  # each KV head repeated on tp / kv consecutive ranks
            rep = tp // kv
            hf[out + "self_attn.k_proj.weight"] = torch.cat([same(list(k[g * rep : (g + 1) * rep])) for g in range(kv)])
            hf[out + "self_attn.v_proj.weight"] = torch.cat([same(list(v[g * rep : (g + 1) * rep])) for g in range(kv)])
        hf[out + "self_attn.o_proj.weight"] = torch.cat([weight(r, pre + "attention.dense") for r in rs], dim=1)
        hf[out + "mlp.gate_proj.weight"] = torch.cat([weight(r, pre + "mlp.fc") for r in rs])
        hf[out + "mlp.up_proj.weight"] = torch.cat([weight(r, pre + "mlp.gate") for r in rs])
        hf[out + "mlp.down_proj.weight"] = torch.cat([weight(r, pre + "mlp.proj") for r in rs], dim=1)
        hf[out + "input_layernorm.weight"] = same([weight(r, pre + "input_layernorm") for r in rs])
        hf[out + "post_attention_layernorm.weight"] = same([weight(r, pre + "post_layernorm") for r in rs])
    for r, rank in enumerate(ranks):  # nothing else in any file, and each stage holds exactly its layers
        stage = r // tp
        layers = {int(n.split(".")[2]) for n in rank if n.startswith("transformer.layers.")}
        assert layers == set(range(per_stage)), (r, layers)
        extra = {n for n in rank if not n.startswith("transformer.layers.")}
        expected = ({"transformer.vocab_embedding.weight"} if stage == 0 else set()) | (
            {"transformer.ln_f.weight", "lm_head.weight"} if stage == pp - 1 else set()
        )
        assert extra == expected, (r, extra)
    return cfg, hf, ranks


def check_config(cfg: dict, hf_cfg: dict, tp: int, pp: int, dtype: str, quant_algo: str | None) -> None:
    assert cfg["architecture"] == "LlamaForCausalLM"
    assert cfg["dtype"] == dtype
    pairs = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_hidden_layers": "num_hidden_layers",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_key_value_heads",
        "intermediate_size": "intermediate_size",
        "max_position_embeddings": "max_position_embeddings",
        "norm_epsilon": "rms_norm_eps",
        "rotary_base": "rope_theta",
        "tie_word_embeddings": "tie_word_embeddings",
    }
    for ours, theirs in pairs.items():
        expected = hf_cfg[theirs] if theirs in hf_cfg else hf_cfg["rope_parameters"]["rope_theta"]
        assert cfg[ours] == pytest.approx(expected), ours
    assert cfg["head_size"] == hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
    assert cfg["hidden_act"] == "silu" and cfg["position_embedding_type"] == "rope_gpt_neox"
    rope = hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = cfg["rotary_scaling"]
        assert scaling["type"] == scaling["rope_type"] == "llama3"
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            assert scaling[key] == rope[key], key
    else:
        assert cfg["rotary_scaling"] is None
    assert cfg["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert cfg["quantization"]["quant_algo"] == quant_algo
    assert cfg["quantization"]["kv_cache_quant_algo"] is None


def assert_same_weights(read: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tied: bool) -> None:
    reference = dict(reference)
    if tied:
        reference["lm_head.weight"] = reference["model.embed_tokens.weight"]
    assert set(read) == set(reference)
    for name, expected in reference.items():
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name


# ---- layouts -----------------------------------------------------------------------------------------------


def test_cli_tp2_pp2_engine_command_and_refused_dst(sources, tmp_path, llmhpc_cache):
    """The real CLI: tp=2 x pp=2, GQA, untied, vocab 101 padded to 102; build_engine without tensorrt_llm prints
    the command; a second conversion onto the same dst is refused and leaves it as it was."""
    src, reference = sources["gqa"]
    dst = tmp_path / "trt"
    proc = run_cli(
        [
            "convert",
            f"src={src}",
            "to=trtllm",
            f"dst={dst}",
            "tp=2",
            "pp=2",
            "dtype=float32",
            "build_engine=true",
            "max_batch_size=4",
            "max_input_len=128",
            "max_seq_len=256",
        ],
        llmhpc_cache,
    )
    cfg, read, ranks = read_trtllm(dst)
    check_config(cfg, json.loads((src / "config.json").read_text()), 2, 2, "float32", None)
    assert ranks[2]["lm_head.weight"].shape == (51, 64)
    assert_same_weights(read, reference, tied=False)
    assert "(trtllm)" in proc.stdout
    lineage = json.loads((dst / "lineage.json").read_text())
    assert lineage["source"]["format"] == "hf" and lineage["options"]["tp"] == 2
    command = (
        f"trtllm-build --checkpoint_dir {dst} --output_dir {dst / 'engine'} --max_batch_size 4 "
        f"--max_input_len 128 --max_seq_len 256 --gemm_plugin auto"
    )
    if importlib.util.find_spec("tensorrt_llm") is None:
        assert command in proc.stderr, proc.stderr
        assert not (dst / "engine").exists()
    else:
        assert (dst / "engine").is_dir()

    before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    with pytest.raises(InputError, match="already exists"):
        _convert(src, dst, tp=1)
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == before


@pytest.mark.parametrize(
    ("kind", "tp", "pp"),
    [("gqa", 4, 1), ("gqa", 1, 1), ("tied", 2, 1), ("tied", 1, 2)],
    ids=["gqa-tp4-kv-repeated", "gqa-tp1", "tied-tp2", "tied-pp2"],
)
def test_layouts_bit_for_bit(sources, tmp_path, kind, tp, pp):
    src, reference = sources[kind]
    dst = tmp_path / "trt"
    _convert(src, dst, tp=tp, pp=pp, dtype="float32")
    cfg, read, _ = read_trtllm(dst)
    check_config(cfg, json.loads((src / "config.json").read_text()), tp, pp, "float32", None)
    assert_same_weights(read, reference, tied=SHAPES[kind]["tie_word_embeddings"])


def test_tp2_pp2_checkpoint_to_tp2(tp2_pp2_checkpoint, tmp_path):
    """A real run sharded tp=2 x pp=2, converted straight to a tp=2 TensorRT-LLM checkpoint."""
    from llmhpc.models import load_pretrained
    from llmhpc.models.hf import state_dict_to_hf

    dst = tmp_path / "trt"
    _convert(tp2_pp2_checkpoint, dst, tp=2, pp=1, dtype="float32")
    model, _ = load_pretrained(tp2_pp2_checkpoint)
    reference = state_dict_to_hf(model.state_dict())
    cfg, read, _ = read_trtllm(dst)
    assert cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"]
    assert_same_weights(read, reference, tied=True)


def test_refusals_before_writing(sources, tmp_path):
    src, _ = sources["gqa"]
    dst = tmp_path / "trt"
    for options, match in [
        (dict(tp=3), "tp=3 does not divide the model's 4 attention heads"),
        (dict(pp=3), "pp=3 does not divide the model's 4 layers"),
        (dict(tp=2, quant="int8_wo"), "multiples of 128"),
        (dict(quant="fp8", dtype="float32"), "needs dtype=float16 or bfloat16"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _convert(src, dst, **options)
        assert not dst.exists() and not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="no tokenizer"):
        _convert(src, dst, quant="fp8", dtype="bfloat16")
    assert not list(tmp_path.iterdir())


# ---- quantization ------------------------------------------------------------------------------------------


def _trtllm_weight_only(w: torch.Tensor, bits: int) -> torch.Tensor:
    """TensorRT-LLM's per-channel rule (cutlass_preprocessors symmetric_quantize), dequantized: scale =
    amax / 2^(bits-1) stored in the weight's dtype, q = clamp(round half away from zero, -2^(bits-1), 2^(bits-1)-1)."""
    x = w.double()
    scale = x.abs().amax(dim=1, keepdim=True) / 2 ** (bits - 1)
    q = torch.round(x / scale)  # no exact halves occur in random weights
    q = q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q * scale.to(w.dtype).double()


@pytest.mark.parametrize(
    ("quant", "tp", "requested", "dtype", "bits", "bound"),
    [("int8_wo", 2, "bfloat16", "bfloat16", 8, 0.02), ("int4_wo", 1, "auto", "float16", 4, 0.3)],
)
def test_weight_only(sources, tmp_path, quant, tp, requested, dtype, bits, bound):
    """W8A16 / W4A16: the block linears stay in dtype for trtllm-build to quantize for its GPU; the lineage reports
    the error TensorRT-LLM's rule will give on each rank's shard. dtype=auto on an fp32 source means float16."""
    src, reference = sources["quant"]
    dst = tmp_path / "trt"
    _convert(src, dst, tp=tp, quant=quant, dtype=requested)
    cfg, read, ranks = read_trtllm(dst)
    check_config(cfg, json.loads((src / "config.json").read_text()), tp, 1, dtype, {8: "W8A16", 4: "W4A16"}[bits])
    torch_dtype = getattr(torch, dtype)
    assert_same_weights(read, {k: v.to(torch_dtype) for k, v in reference.items()}, tied=False)
    assert not any(name.endswith("per_channel_scale") for rank in ranks for name in rank)
    error_sq = norm_sq = 0.0
    for rank in ranks:
        for name, w in rank.items():
            if name.endswith(("qkv.weight", "dense.weight", "fc.weight", "gate.weight", "proj.weight")):
                error_sq += float((w.double() - _trtllm_weight_only(w, bits)).square().sum())
                norm_sq += float(w.double().square().sum())
    reported = json.loads((dst / "lineage.json").read_text())["options"]
    assert reported["quantized_by"] == "trtllm-build"
    assert reported["weight_relative_error"] == pytest.approx((error_sq / norm_sq) ** 0.5, rel=1e-6)
    assert 0 < reported["weight_relative_error"] < bound


def test_fp8_weights_and_calibrated_activation_scales(sources, tmp_path):
    src, reference = sources["quant"]
    dst = tmp_path / "trt"
    _convert(src, dst, tp=2, quant="fp8", dtype="bfloat16")
    cfg, read, ranks = read_trtllm(dst)
    check_config(cfg, json.loads((src / "config.json").read_text()), 2, 1, "bfloat16", "FP8")
    with safe_open(str(dst / "rank0.safetensors"), framework="pt") as f:
        assert f.get_slice("transformer.layers.0.attention.qkv.weight").get_dtype() == "F8_E4M3"
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, expected in reference.items():
        if not name.endswith(tuple(f"{x}.weight" for x in linears)):  # norms, embedding, lm_head stay bf16
            assert torch.equal(read[name], expected.to(torch.bfloat16)), name
    lineage = json.loads((dst / "lineage.json").read_text())["options"]
    input_ids = torch.tensor(lineage["calibration"]["input_ids"])
    assert input_ids.shape == (8, 256) and (input_ids[:, 0] == 256).all()  # BOS first
    assert 0 < lineage["weight_relative_error"] < 0.05

    hf_model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    amax: dict[str, float] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, key=key: amax.__setitem__(key, max(amax.get(key, 0.0), float(args[0].abs().amax())))
        )
        for key, module in hf_model.named_modules()
        if key.endswith(linears) and ".layers." in key
    ]
    with torch.no_grad():
        hf_model(input_ids)
    for hook in hooks:
        hook.remove()

    for i in range(cfg["num_hidden_layers"]):
        pre, hf_pre = f"transformer.layers.{i}.", f"model.layers.{i}."
        groups = {
            "attention.qkv": ("self_attn.q_proj",),
            "attention.dense": ("self_attn.o_proj",),
            "mlp.fc": ("mlp.gate_proj",),
            "mlp.gate": ("mlp.up_proj",),
            "mlp.proj": ("mlp.down_proj",),
        }
        groups["attention.qkv"] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        for ours, theirs in groups.items():
            w_amax = max(float(reference[hf_pre + x + ".weight"].abs().amax()) for x in theirs)
            for rank in ranks:  # one scale per tensor, the same on every rank
                assert rank[pre + ours + ".weights_scaling_factor"].item() == pytest.approx(w_amax / 448, rel=1e-6)
                assert rank[pre + ours + ".activation_scaling_factor"].item() == pytest.approx(
                    amax[hf_pre + theirs[0]] / 448, rel=1e-4
                )
            for x in theirs:  # dequantized within e4m3's rounding: 2^-4 relative, 2^-10 scale among subnormals
                w, deq = reference[hf_pre + x + ".weight"], read[hf_pre + x + ".weight"]
                scale = w_amax / 448
                assert (
                    (deq - w).abs() <= torch.maximum(w.abs() * 2**-4, torch.tensor(scale * 2**-10)) * (1 + 1e-5)
                ).all(), hf_pre + x
