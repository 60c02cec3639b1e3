"""token_logprobs through a vocabulary-sharded head (tp=2, loss parallel, gloo) against one process.

One spawn of 2 real processes runs every scenario; each compares the chunked log-probs of the TP model's
Shard(-1) logits, and the gradients they send to every parameter, with the full log_softmax of the
unsharded model's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.train.losses import IGNORE_INDEX
from tests.distributed.launch import spawn_gloo

TP = 2
BATCH, SEQ, VOCAB = 2, 16, 256
CHUNK = 5  # 32 tokens: six full chunks and a ragged one
TOL = 1e-5


def _model(tied: bool):
    from llmhpc.models.llama import Llama

    cfg = ModelConfig(name="lp-tp", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=64, tie_embeddings=tied)
    torch.manual_seed(0)
    model = Llama(cfg)
    model.init_weights()
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same input ids, targets (some ignored) and per-token coefficients on every rank."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    targets = ids[:, 1:].clone()
    targets[0, :3] = IGNORE_INDEX
    targets[1, -2:] = IGNORE_INDEX
    return ids[:, :-1].contiguous(), targets, torch.randn(BATCH, SEQ, generator=gen)


def _logprobs_match(mesh, tied: bool, sp: bool) -> dict[str, Any]:
    import copy

    from torch.distributed.tensor.parallel import loss_parallel

    from llmhpc.parallel.tensor import apply_tensor_parallel
    from llmhpc.train.logprobs import linear_token_logprobs, token_logprobs

    ref = _model(tied)
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh, sequence_parallel=sp, loss_parallel=True)
    ids, targets, coeff = _batch()

    keep = targets != IGNORE_INDEX
    full = torch.log_softmax(ref(ids).float(), dim=-1)
    ref_lp = torch.where(keep, full.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    (ref_lp * coeff).sum().backward()

    with loss_parallel():  # forward and backward both inside, as loss parallel requires
        hidden = model(ids, return_hidden=True)
        lp = token_logprobs(hidden, model.logits, targets, chunk_tokens=CHUNK)
        with torch.no_grad():
            head_out = model.logits(hidden[:, :2])
        (lp * coeff).sum().backward()

    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    grad_diff, missing = 0.0, []
    for name, p in model.named_parameters():
        if p.grad is None:
            missing.append(name)
            continue
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # norms are plain without SP
        grad_diff = max(grad_diff, float((grad - ref_grads[name]).abs().max()))
    try:
        linear_token_logprobs(hidden.detach(), model.lm_head_weight(), targets)
        plain_weight_check = "accepted a DTensor weight"
    except TypeError as err:
        plain_weight_check = str(err)
    return {
        "values": float((lp.detach() - ref_lp.detach()).abs().max()),
        "ignored_zero": bool((lp.detach()[~keep] == 0).all()),
        "lp_type": type(lp).__name__,
        "head_placements": str(getattr(head_out, "placements", "plain")),
        "grads": grad_diff,
        "grad_scale": max(float(g.abs().max()) for g in ref_grads.values()),
        "missing_grads": missing,
        "plain_weight_check": plain_weight_check,
    }


def scenarios(world: int) -> dict[str, Callable]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    return {
        f"tied{int(tied)}-sp{int(sp)}": (lambda t=tied, s=sp: _logprobs_match(mesh, t, s))
        for tied in (False, True)
        for sp in (True, False)
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    return spawn_gloo(TP, scenarios, tmp_path_factory.mktemp("logprobs_tp"))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no-sp"])
def test_token_logprobs_through_loss_parallel_head_match_one_process(results, tied: bool, sp: bool) -> None:
    name = f"tied{int(tied)}-sp{int(sp)}"
    for rank, per_rank in enumerate(results):
        res = per_rank[name]
        assert "error" not in res, f"rank {rank} failed in {name}:\n{res['error']}"
        assert res["head_placements"] == "(Shard(dim=2),)", res  # the head really is vocabulary-sharded
        assert res["lp_type"] == "Tensor", res
        assert res["values"] < TOL, res
        assert res["ignored_zero"], res
        assert not res["missing_grads"], res
        assert res["grads"] < TOL, res
        assert res["grad_scale"] > 1e-3, res  # gradients large enough for the comparison to mean something
        assert "plain weight tensor" in res["plain_weight_check"], res

