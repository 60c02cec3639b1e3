"""LoRA applied on the meta device, then sharded with FSDP2 or split by tensor parallel and initialized there (the
builder's order), must start from exactly the adapters of a one-process model, give its logits and gradients,
train only the adapters, and save them whole."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import spawn_gloo


def _scenarios(world: int) -> dict:
    def fsdp2_meta_apply_reset_and_step() -> dict:
        from torch.distributed.fsdp import fully_shard

        from llmhpc.config.schema import ModelConfig
        from llmhpc.models import build_model
        from llmhpc.peft.lora import LoRAConfig, adapter_state_dict, apply_lora, reset_lora_parameters

        cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
        lora = LoRAConfig(rank=4, dora=True)
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))

        def initialized(model) -> None:
            torch.manual_seed(0)
            model.init_weights()
            torch.manual_seed(1)
            reset_lora_parameters(model)

        reference = build_model(cfg)
        apply_lora(reference, lora)
        initialized(reference)
        reference(ids).pow(2).mean().backward()

        model = build_model(cfg, device="meta")
        apply_lora(model, lora)
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        initialized(model)
        model(ids).pow(2).mean().backward()  # the same batch on every rank: FSDP's mean gradient is the reference's

        saved, expected = adapter_state_dict(model), adapter_state_dict(reference)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        return {
            "adapters_equal": saved.keys() == expected.keys()
            and all(torch.equal(saved[k], expected[k]) for k in saved),
            "grad_names_equal": sorted(grads) == sorted(ref_grads),
            "grad_max_diff": max((grads[n].full_tensor() - ref_grads[n]).abs().max().item() for n in ref_grads),
        }

    def tp2_meta_apply_reset_and_step(dora: bool) -> dict:
        from torch.distributed.device_mesh import init_device_mesh

        from llmhpc.config.schema import ModelConfig
        from llmhpc.models import build_model
        from llmhpc.parallel.tensor import apply_tensor_parallel
        from llmhpc.peft.lora import LoRAConfig, adapter_state_dict, apply_lora, reset_lora_parameters

        cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
        lora = LoRAConfig(rank=4, dora=dora)
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))

        def initialized(model) -> None:
            torch.manual_seed(0)
            model.init_weights()
            torch.manual_seed(1)
            reset_lora_parameters(model)
            with torch.no_grad():  # trained adapters: B != 0, so both of the adapter's factors get gradients
                for name, p in model.named_parameters():
                    if name.endswith("lora_B"):
                        p.add_(0.01)

        reference = build_model(cfg)
        apply_lora(reference, lora)
        initialized(reference)
        ref_logits = reference(ids)
        ref_logits.pow(2).mean().backward()

        model = build_model(cfg, device="meta")
        apply_lora(model, lora)
        apply_tensor_parallel(model, init_device_mesh("cpu", (world,)))
        model.to_empty(device="cpu")
        initialized(model)
        logits = model(ids)
        logits.pow(2).mean().backward()

        saved, expected = adapter_state_dict(model), adapter_state_dict(reference)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        base_trains = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
        return {
            "adapters_equal": saved.keys() == expected.keys()
            and all(torch.allclose(saved[k], expected[k], atol=1e-6) for k in saved),
            "grad_names_equal": sorted(grads) == sorted(ref_grads),
            "frozen_base_still_frozen": not base_trains,
            "logits_max_diff": (logits - ref_logits).abs().max().item(),
            "grad_max_diff": max((grads[n].full_tensor() - ref_grads[n]).abs().max().item() for n in ref_grads),
        }

    def fsdp2_shards_the_nf4_base() -> dict:
        from llmhpc.config.schema import ModelConfig, ParallelConfig
        from llmhpc.models import build_model
        from llmhpc.models.adapters import is_nf4
        from llmhpc.parallel.fsdp import apply_fsdp
        from llmhpc.peft.lora import LoRAConfig, apply_lora, reset_lora_parameters
        from llmhpc.peft.nf4 import quantize_base_nf4

        cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=64)
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))

        def qlora_model():  # the builder's order under FSDP2: base loaded whole, quantized, then sharded
            torch.manual_seed(0)
            model = build_model(cfg)
            apply_lora(model, LoRAConfig(rank=4))
            quantize_base_nf4(model)
            return model

        def with_trained_adapters(model):
            torch.manual_seed(1)
            reset_lora_parameters(model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("lora_B"):
                        p.add_(0.01)
            return model

        reference = with_trained_adapters(qlora_model())
        ref_logits = reference(ids)
        ref_logits.pow(2).mean().backward()
        model = qlora_model()
        from torch.distributed.device_mesh import init_device_mesh

        apply_fsdp(model, init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",)), ParallelConfig())
        with_trained_adapters(model)
        logits = model(ids)
        logits.pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        wk = model.layers["0"].attention.wk.weight
        return {
            "local_nf4_rows": [is_nf4(wk.to_local()), wk.to_local().shape[0], wk.shape[0]],
            "grad_names_equal": sorted(grads) == sorted(ref_grads),
            "logits_max_diff": (logits - ref_logits).abs().max().item(),
            "grad_max_diff": max((grads[n].full_tensor() - ref_grads[n]).abs().max().item() for n in ref_grads),
        }

    return {"fsdp2": fsdp2_meta_apply_reset_and_step,
            "fsdp2_qlora": fsdp2_shards_the_nf4_base,
            "tp2_lora": lambda: tp2_meta_apply_reset_and_step(False),
            "tp2_dora": lambda: tp2_meta_apply_reset_and_step(True)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario, run once on 2 gloo processes: per rank, {scenario: result}."""
    return spawn_gloo(2, _scenarios, tmp_path_factory.mktemp("lora_parallel"))


def test_lora_under_fsdp2_matches_one_process(ranks):
    for rank, results in enumerate(ranks):
        result = results["fsdp2"]
        assert "error" not in result, result.get("error")
        assert result["adapters_equal"] and result["grad_names_equal"], (rank, result)
        assert result["grad_max_diff"] <= 1e-6, (rank, result)


def test_lora_and_dora_under_tensor_parallel_match_one_process(ranks):
    for rank, results in enumerate(ranks):
        for name in ("tp2_lora", "tp2_dora"):
            result = results[name]
            assert "error" not in result, result.get("error")
            assert result["adapters_equal"] and result["grad_names_equal"], (rank, name, result)
            assert result["frozen_base_still_frozen"], (rank, name, result)
            assert result["logits_max_diff"] <= 1e-5 and result["grad_max_diff"] <= 1e-6, (rank, name, result)


def test_qlora_under_fsdp2_shards_the_nf4_base_and_matches_one_process(ranks):
    for rank, results in enumerate(ranks):
        result = results["fsdp2_qlora"]
        assert "error" not in result, result.get("error")
        assert result["local_nf4_rows"] == [True, 16, 32], (rank, result)  # half of wk's rows, still NF4
        assert result["grad_names_equal"], (rank, result)
        assert result["logits_max_diff"] <= 1e-6 and result["grad_max_diff"] <= 1e-6, (rank, result)
