"""LoRA / rsLoRA / DoRA on our Llama must train only adapters and match Hugging Face peft exactly.

peft (loading our saved adapter onto transformers' LlamaForCausalLM built from our HF export) is the
numerical reference for logits and gradients; the model has GQA (q and k projections of different sizes),
so a q/k layout mismatch between our adapter file and HF's weights fails here.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llmhpc.config.schema import ModelConfig, TrainerConfig
from llmhpc.errors import InputError
from llmhpc.models import build_model, load_pretrained
from llmhpc.models.hf import save_hf
from llmhpc.peft.lora import (
    TARGETS,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    base_state_dict,
    fold_adapter,
    load_peft_adapter,
    lora_modules,
    merge_lora,
    read_peft_adapter,
    reset_lora_parameters,
    save_peft_adapter,
)
from llmhpc.peft.merge import main as merge_main
from llmhpc.train.optim import build_optimizer

TOL = 1e-5
# peft's PeftModel calls a transformers method that transformers 5 deprecates: their noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VARIANTS = {
    "lora": LoRAConfig(rank=4, alpha=8.0),
    "rslora": LoRAConfig(rank=4, alpha=3.0, rslora=True, dropout=0.1),
    "dora": LoRAConfig(rank=4, alpha=8.0, dora=True),
    "dora_rslora_qv": LoRAConfig(rank=2, alpha=5.0, dora=True, rslora=True, targets=["q", "v"]),
}


def _cfg() -> ModelConfig:
    return ModelConfig(
        vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64, init_std=0.05
    )


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(_cfg()).eval()


@torch.no_grad()
def _randomize_adapters(model, seed: int = 1) -> None:
    """Nonzero B (and a magnitude off ||W||) so every adapter term shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
        if m.lora_magnitude is not None:
            m.lora_magnitude.mul_(1 + 0.3 * torch.rand(m.lora_magnitude.shape, generator=gen))


def _ids(n: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, 96, (n, seq), generator=torch.Generator().manual_seed(7))


def test_only_adapters_train_and_the_optimizer_sees_only_them():
    model = _model()
    wrapped = apply_lora(model, LoRAConfig(rank=4, dora=True))
    assert len(wrapped) == 2 * len(TARGETS) and wrapped[0] == "layers.0.attention.wq"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.{k}" for w in wrapped for k in ("lora_A", "lora_B", "lora_magnitude")}
    # The base keeps its names (checkpoints and HF names do not change).
    assert set(base_state_dict(model)) == set(_model().state_dict())
    optimizer, _ = build_optimizer(model, TrainerConfig())
    seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    loss = model(_ids()).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fresh_adapters_leave_the_logits_unchanged(name):
    ids = _ids()
    with torch.no_grad():
        expected = _model()(ids)
    model = _model()
    apply_lora(model, VARIANTS[name])
    with torch.no_grad():
        assert torch.equal(model(ids), expected)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_disabled_adapters_give_the_base_logits_and_come_back_on(name):
    ids = _ids()
    with torch.no_grad():
        base = _model()(ids)
    model = _model()
    apply_lora(model, VARIANTS[name])
    _randomize_adapters(model)
    with torch.no_grad():
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-2
        with adapters_disabled(model):
            assert torch.equal(model(ids), base)
        assert torch.equal(model(ids), adapted)


def _peft_reference(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_peft_loads_our_adapter_with_the_same_logits_and_gradients(name, tmp_path):
    cfg = VARIANTS[name]
    model = _model()
    save_hf(model, tmp_path / "base")
    apply_lora(model, cfg)
    _randomize_adapters(model)
    save_peft_adapter(model, cfg, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == cfg.rank and written["use_dora"] is cfg.dora and written["use_rslora"] is cfg.rslora
    start = time.perf_counter()
    reference = _peft_reference(tmp_path / "base", tmp_path / "adapter")
    print(f"{name}: peft load {time.perf_counter() - start:.2f}s")

    ids = _ids()
    ours, theirs = model(ids), reference(ids).logits
    with torch.no_grad():
        base = _model()(ids)
    diff, effect = (ours - theirs).abs().max().item(), (ours - base).abs().max().item()
    print(f"{name}: max |ours - peft| {diff:.3g}, adapter effect {effect:.3g}")
    assert effect > 1e-2  # the adapters matter, so agreement is not vacuous
    assert diff <= TOL

    # Gradients of every adapter tensor agree too (DoRA's detached norm included).
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    ref_grads = {
        k.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
        for k, p in reference.named_parameters()
        if p.requires_grad
    }
    params = dict(model.named_parameters())
    names = zip(adapter_state_dict(model), adapter_state_dict(model, peft_names=False), strict=True)
    ours_grads = {peft_key: params[our_key].grad for peft_key, our_key in names}
    assert ours_grads.keys() == ref_grads.keys()
    for key, grad in ours_grads.items():
        scale = ref_grads[key].abs().max().item()
        assert (grad - ref_grads[key]).abs().max().item() <= 1e-4 * scale + 1e-9, key


def test_dropout_in_training_matches_peft(tmp_path):
    """With dropout active peft computes DoRA's W x term on the dropped-out input; so do we (same RNG draws)."""
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.3, dora=True, targets=["q", "k", "v", "gate", "up", "down"])
    model = _model()
    save_hf(model, tmp_path / "base")
    apply_lora(model, cfg)
    _randomize_adapters(model)
    save_peft_adapter(model, cfg, tmp_path / "adapter")
    reference = _peft_reference(tmp_path / "base", tmp_path / "adapter")
    model.train()
    reference.train()
    ids = _ids()
    torch.manual_seed(3)
    ours = model(ids)
    torch.manual_seed(3)
    theirs = reference(ids).logits
    with torch.no_grad():
        evaluated = model.eval()(ids)
    assert (ours - evaluated).abs().max().item() > 1e-3  # dropout did act
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merge_gives_the_adapted_logits_with_plain_linears(name, tmp_path):
    model = _model()
    apply_lora(model, VARIANTS[name])
    _randomize_adapters(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
        merged = merge_lora(model)
        assert merged is model
        got = merged(ids)
    assert not lora_modules(model)
    for suffix in TARGETS.values():
        module = model.get_submodule(f"layers.1.{suffix}")
        assert type(module) is nn.Linear and module.bias is None
    assert set(model.state_dict()) == set(_model().state_dict())
    assert (got - expected).abs().max().item() <= TOL
    # The merged model exports as any model would.
    save_hf(model, tmp_path / "merged")


@pytest.mark.parametrize("name", ["rslora", "dora"])
def test_save_load_round_trip_is_bitwise(name, tmp_path):
    cfg = VARIANTS[name]
    model = _model()
    apply_lora(model, cfg)
    _randomize_adapters(model)
    save_peft_adapter(model, cfg, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0"
    assert f"{prefix}.self_attn.q_proj.lora_A.weight" in saved
    assert f"{prefix}.mlp.down_proj.lora_B.weight" in saved
    assert (f"{prefix}.self_attn.k_proj.lora_magnitude_vector" in saved) is cfg.dora

    into_plain = _model(seed=5)  # no adapters yet: the config comes from adapter_config.json
    assert load_peft_adapter(into_plain, tmp_path).same_adapter(cfg)
    into_wrapped = _model(seed=5)
    apply_lora(into_wrapped, cfg)
    load_peft_adapter(into_wrapped, tmp_path)
    expected = adapter_state_dict(model, peft_names=False)
    for loaded in (into_plain, into_wrapped):
        got = adapter_state_dict(loaded, peft_names=False)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)

    other = _model()
    apply_lora(other, LoRAConfig(rank=8))
    with pytest.raises(InputError, match="differs"):
        load_peft_adapter(other, tmp_path)


def test_meta_device_apply_then_materialize():
    cfg = LoRAConfig(rank=4, dora=True)
    meta = build_model(_cfg(), device="meta")
    apply_lora(meta, cfg)
    assert all(p.is_meta for p in meta.parameters())
    torch.manual_seed(0)  # the same draws build_model makes in _model()
    meta.to_empty(device="cpu")
    meta.init_weights()
    reset_lora_parameters(meta)
    meta.eval()
    for _, m in lora_modules(meta):
        assert not m.lora_A.is_meta and m.lora_A.abs().sum() > 0 and not m.lora_B.any()
        assert torch.allclose(m.lora_magnitude, torch.linalg.norm(m.weight, dim=1))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(meta(ids), _model()(ids))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="targets"):
        apply_lora(_model(), LoRAConfig(targets=["q_proj"]))
    model = _model()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(InputError, match="bias"):
        LoRAConfig.from_peft({**LoRAConfig().to_peft(), "bias": "all"})
    assert isinstance(model.layers["0"].attention.wq, LoRALinear)


def test_merge_cli_and_streaming_fold(tmp_path):
    """`python -m llmhpc.peft merge` writes an HF model with the adapted logits; `read_peft_adapter` +
    `fold_adapter` (what a streaming converter uses, no model built) give the same weights as `merge_lora`."""
    cfg = VARIANTS["dora_rslora_qv"]
    model = _model()
    save_hf(model, tmp_path / "base")
    apply_lora(model, cfg)
    _randomize_adapters(model)
    save_peft_adapter(model, cfg, tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
    args = ["merge", f"base={tmp_path / 'base'}", f"adapter={tmp_path / 'adapter'}", f"dst={tmp_path / 'merged'}"]
    assert merge_main(args) == 0
    assert merge_main(args) == 1  # dst exists: refused without overwrite=true
    assert merge_main(["merge", "base=x"]) == 2
    merged, _ = load_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (merged(ids) - expected).abs().max().item() <= TOL

    read_cfg, adapters = read_peft_adapter(tmp_path / "adapter")
    assert read_cfg.same_adapter(cfg) and sorted(adapters) == sorted(n for n, _ in lora_modules(model))
    state = merged.state_dict()
    for name, t in adapters.items():
        base = model.get_submodule(name).weight
        folded = fold_adapter(base, t["lora_A"], t["lora_B"], cfg.scaling, t.get("lora_magnitude"))
        assert torch.equal(folded, state[f"{name}.weight"]), name
