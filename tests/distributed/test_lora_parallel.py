"""LoRA applied on the meta device, then sharded with FSDP2 or split by tensor parallel and initialized there (the
builder's order), must start from exactly the adapters of a one-process model, give its logits and gradients,
train only the adapters, and save them whole; a QLoRA model's NF4 base must shard under FSDP2 as NF4."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import spawn_gloo

SHAPE = {"vocab_size": 96, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 192, "max_seq_len": 64}


def _model(device: str = "cpu", **lora):
    """The small model with adapters on every projection (LoRAConfig(rank=4, **lora)), drawn from seed 0."""
    from llmhpc.config.schema import ModelConfig
    from llmhpc.models import build_model
    from llmhpc.peft.lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPE), device=device)
    apply_lora(model, LoRAConfig(rank=4, **lora))
    return model


def _trained_adapters(model):
    """Adapters drawn from seed 1 as a run draws them, then moved off B = 0 so both factors get gradients."""
    from llmhpc.peft.lora import reset_lora_parameters

    torch.manual_seed(1)
    reset_lora_parameters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.add_(0.01)
    return model


def _materialized(model):
    """A meta-device model laid out already: its base drawn from seed 0 on each rank, then its adapters."""
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return _trained_adapters(model)


def _against(model, reference) -> dict:
    """One forward / backward of the same batch on both: how far the laid-out model is from the reference."""
    from llmhpc.peft.lora import adapter_state_dict

    ids = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    ref_logits, logits = reference(ids), model(ids)
    ref_logits.pow(2).mean().backward()
    logits.pow(2).mean().backward()  # the same batch on every rank: FSDP's mean gradient is the reference's
    saved, expected = adapter_state_dict(model), adapter_state_dict(reference)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    return {
        "adapters_equal": saved.keys() == expected.keys()
        and all(torch.allclose(saved[k], expected[k], atol=1e-6) for k in saved),
        "grad_names_equal": sorted(grads) == sorted(ref_grads) and all(".lora_" in n for n in grads),
        "frozen_base_still_frozen": not [n for n, p in model.named_parameters() if p.requires_grad
                                         and ".lora_" not in n],
        "logits_max_diff": (logits - ref_logits).abs().max().item(),
        "grad_max_diff": max((grads[n].full_tensor() - ref_grads[n]).abs().max().item() for n in ref_grads),
    }


def _scenarios(world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    def fsdp2(dora: bool) -> dict:
        from torch.distributed.fsdp import fully_shard

        model = _model("meta", dora=dora)
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        return _against(_materialized(model), _trained_adapters(_model(dora=dora)))

    def tp2(dora: bool) -> dict:
        from llmhpc.parallel.tensor import apply_tensor_parallel

        model = _model("meta", dora=dora)
        apply_tensor_parallel(model, init_device_mesh("cpu", (world,)))
        return _against(_materialized(model), _trained_adapters(_model(dora=dora)))

    def fsdp2_qlora() -> dict:
        from llmhpc.config.schema import ParallelConfig
        from llmhpc.models.adapters import is_nf4
        from llmhpc.parallel.fsdp import apply_fsdp
        from llmhpc.peft.nf4 import quantize_base_nf4

        def qlora_model():  # the builder's order under FSDP2: base whole, quantized, then sharded
            model = _model()
            quantize_base_nf4(model)
            return model

        model = qlora_model()
        apply_fsdp(model, init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",)), ParallelConfig())
        wk = model.layers["0"].attention.wk.weight.to_local()
        return {**_against(_trained_adapters(model), _trained_adapters(qlora_model())),
                "local_nf4_rows": [is_nf4(wk), wk.shape[0]]}

    def tp2_qlora(dora: bool) -> dict:
        from llmhpc.models.adapters import is_nf4, trained_base
        from llmhpc.parallel.tensor import apply_tensor_parallel
        from llmhpc.peft.lora import lora_modules
        from llmhpc.peft.nf4 import quantize_base_nf4

        model = _model("meta", dora=dora)  # the builder's order under TP: split, loaded, each shard quantized
        apply_tensor_parallel(model, init_device_mesh("cpu", (world,)))
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        quantized = quantize_base_nf4(model)
        reference = _model(dora=dora)  # one process, its dense base holding the values of the quantized shards
        with torch.no_grad():
            for name, module in lora_modules(reference):
                module.weight.copy_(trained_base(name, module.weight, qlora=True, tp=world))
        attention = model.layers["0"].attention
        return {**_against(_trained_adapters(model), _trained_adapters(reference)), "quantized": quantized,
                "local_nf4_shapes": [[is_nf4(w.to_local()), list(w.to_local().shape)]
                                     for w in (attention.wk.weight, attention.wo.weight)]}

    return {"fsdp2_dora": lambda: fsdp2(True), "tp2_lora": lambda: tp2(False), "tp2_dora": lambda: tp2(True),
            "fsdp2_qlora": fsdp2_qlora, "tp2_qlora": lambda: tp2_qlora(False), "tp2_qdora": lambda: tp2_qlora(True)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario, run once on 2 gloo processes: per rank, {scenario: result}."""
    return spawn_gloo(2, _scenarios, tmp_path_factory.mktemp("lora_parallel"))


def _check(ranks: list[dict], name: str, logits: float, grads: float) -> None:
    for rank, results in enumerate(ranks):
        result = results[name]
        assert "error" not in result, result.get("error")
        assert result["adapters_equal"] and result["grad_names_equal"], (rank, name, result)
        assert result["frozen_base_still_frozen"], (rank, name, result)
        assert result["logits_max_diff"] <= logits and result["grad_max_diff"] <= grads, (rank, name, result)


def test_dora_under_fsdp2_matches_one_process(ranks):
    _check(ranks, "fsdp2_dora", logits=1e-6, grads=1e-6)


def test_lora_and_dora_under_tensor_parallel_match_one_process(ranks):
    _check(ranks, "tp2_lora", logits=1e-5, grads=1e-6)
    _check(ranks, "tp2_dora", logits=1e-5, grads=1e-6)


def test_qlora_under_fsdp2_shards_the_nf4_base_and_matches_one_process(ranks):
    _check(ranks, "fsdp2_qlora", logits=1e-6, grads=1e-6)
    assert all(results["fsdp2_qlora"]["local_nf4_rows"] == [True, 16] for results in ranks)  # half of wk, NF4


def test_qlora_under_tensor_parallel_quantizes_each_shard_and_matches_its_values_on_one_process(ranks):
    """Each rank quantizes its own rows (column-wise) or columns (row-wise); a one-process model whose base holds
    those values (`trained_base`, what the exporter folds into) gives the same logits and gradients."""
    for name in ("tp2_qlora", "tp2_qdora"):
        _check(ranks, name, logits=1e-5, grads=1e-6)
        for results in ranks:
            assert results[name]["quantized"] == 2 * 7
            assert results[name]["local_nf4_shapes"] == [[True, [16, 64]], [True, [64, 32]]]  # wk rows, wo columns
