"""LoRA applied on the meta device, then sharded with FSDP2 and initialized there (the builder's order), must
start from exactly the adapters of a one-process model, train only them, and save them whole."""

from __future__ import annotations

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

    return {"fsdp2": fsdp2_meta_apply_reset_and_step}


def test_lora_under_fsdp2_matches_one_process(tmp_path):
    for rank, results in enumerate(spawn_gloo(2, _scenarios, tmp_path)):
        result = results["fsdp2"]
        assert "error" not in result, result.get("error")
        assert result["adapters_equal"] and result["grad_names_equal"], (rank, result)
        assert result["grad_max_diff"] <= 1e-6, (rank, result)
