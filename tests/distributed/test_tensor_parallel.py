"""Tensor + sequence parallel (tp=2, gloo, 2 real processes) against the single-process model.

Spawning processes and importing torch costs seconds on 2 cores, so one spawn runs every scenario
(forward parity, 5 AdamW steps, loss parallel, rejected inputs) and records numbers per scenario; the
tests below only judge them. A scenario that raises records its traceback, which its test reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from llmhpc.config.layout import valid_tp_sizes, validate_tp
from llmhpc.config.schema import ModelConfig
from tests.distributed.launch import spawn_gloo

TP = 2
SEQ = 16
BATCH = 2
STEPS = 5
TOL = 1e-5


def tiny_cfg(tied: bool) -> ModelConfig:
    """Small enough for seconds on 2 cores, with GQA (4 heads / 2 KV heads) so KV heads are sharded too."""
    return ModelConfig(
        name="tp-test",
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        max_seq_len=64,
        tie_embeddings=tied,
    )


# ---- worker side (runs in the spawned ranks) ------------------------------------------------------


def _reference(tied: bool, seed: int = 0):
    from llmhpc.models.llama import Llama

    torch.manual_seed(seed)
    model = Llama(tiny_cfg(tied))
    model.init_weights()
    with torch.no_grad():  # non-trivial norm weights, so a norm that is skipped or misplaced shows up
        for module in model.modules():
            if type(module).__name__ == "RMSNorm":
                module.weight.uniform_(0.5, 1.5)
    return model


def _tp_copy(ref, mesh, **kwargs):
    import copy

    from llmhpc.parallel.tensor import apply_tensor_parallel

    return apply_tensor_parallel(copy.deepcopy(ref), mesh, **kwargs)


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    """Same batches on every rank; document boundaries and ignored labels in some of them."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (BATCH, SEQ + 1), generator=gen)
        batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
        batch["labels"][0, :3] = -100
        if i % 2 == 0:
            docs = torch.zeros(BATCH, SEQ, dtype=torch.long)
            docs[:, 5:] = 1
            docs[1, 11:] = 2
            batch["document_ids"] = docs
        out.append(batch)
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    if isinstance(a, DTensor):
        a = a.full_tensor()
    assert a.shape == b.shape and type(a) is torch.Tensor, (a.shape, b.shape, type(a))
    return float((a - b).abs().max())


def _placement_of(t: torch.Tensor) -> str:
    """'plain' for a torch.Tensor, else the DTensor placements (loss parallel must see Shard(-1) logits)."""
    return "plain" if type(t) is torch.Tensor else str(t.placements)


def _forward(mesh, tied: bool, sp: bool) -> dict[str, Any]:
    ref = _reference(tied)
    model = _tp_copy(ref, mesh, sequence_parallel=sp)
    (batch,) = _batches(1)
    ids, docs = batch["input_ids"], torch.zeros(BATCH, SEQ, dtype=torch.long)
    docs[:, 7:] = 1
    with torch.no_grad():
        return {
            "logits": _max_diff(model(ids), ref(ids)),
            "logits_docs": _max_diff(model(ids, document_ids=docs), ref(ids, document_ids=docs)),
            "hidden": _max_diff(model.hidden_states(ids), ref.hidden_states(ids)),
            "return_hidden_then_logits": _max_diff(
                model.logits(model(ids, return_hidden=True)), ref.logits(ref(ids, return_hidden=True))
            ),
            "state_dict_keys_same": sorted(model.state_dict()) == sorted(ref.state_dict()),
            # A tied model must stay tied (one matrix), and the projections must really be sharded.
            "n_params": [len(list(model.parameters())), len(list(ref.parameters()))],
            "wq_local_rows": model.layers["0"].attention.wq.weight.to_local().shape[0],
        }


def _train(mesh, tied: bool, sp: bool, loss_par: bool) -> dict[str, Any]:
    import contextlib

    from torch.distributed.tensor.parallel import loss_parallel

    from llmhpc.train.losses import token_cross_entropy_sum
    from llmhpc.train.objective import causal_lm_loss

    ref = _reference(tied)
    model = _tp_copy(ref, mesh, sequence_parallel=sp, loss_parallel=loss_par)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    opt_tp = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ref_losses, tp_losses = [], []
    for batch in _batches(STEPS):
        logits = ref(batch["input_ids"], document_ids=batch.get("document_ids"))
        loss, n = token_cross_entropy_sum(logits, batch["labels"])
        (loss / n).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        ref_losses.append(float(loss.detach() / n))

        ctx = loss_parallel() if loss_par else contextlib.nullcontext()
        with ctx:  # loss parallel needs the backward inside the context too
            loss, n = causal_lm_loss(model, batch)
            with torch.no_grad():
                logits_type = _placement_of(model(batch["input_ids"]))
            (loss / n).backward()
        opt_tp.step()
        opt_tp.zero_grad()
        full = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        tp_losses.append(float(full.detach() / n))
    ref_state, initial = ref.state_dict(), _reference(tied).state_dict()
    weights = max(_max_diff(v, ref_state[k]) for k, v in model.state_dict().items())
    return {
        "ref_losses": ref_losses,
        "tp_losses": tp_losses,
        "loss": max(abs(a - b) for a, b in zip(ref_losses, tp_losses, strict=True)),
        "weights": weights,
        "logits": logits_type,
        "moved": max(_max_diff(v, initial[k]) for k, v in model.state_dict().items()),
    }


def _rejects(mesh) -> dict[str, Any]:
    model = _tp_copy(_reference(False), mesh, sequence_parallel=True)
    out = {}
    for name, call in {
        "odd_seq": lambda: model(torch.zeros(1, SEQ - 1, dtype=torch.long)),
        "cache": lambda: model(torch.zeros(1, SEQ, dtype=torch.long), cache=object()),
    }.items():
        try:
            call()
            out[name] = "no error"
        except ValueError as err:
            out[name] = str(err)
    return out


def _padded(mesh, sp: bool) -> dict[str, Any]:
    """A left-padded batch (attention_mask) and a packed one (document_ids + restarting position_ids)."""
    ref = _reference(False)
    model = _tp_copy(ref, mesh, sequence_parallel=sp)
    (batch,) = _batches(1)
    ids = batch["input_ids"]
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, :5] = 0
    docs = torch.zeros(BATCH, SEQ, dtype=torch.long)
    docs[:, 6:] = 1
    pos = torch.cat([torch.arange(6), torch.arange(SEQ - 6)]).expand(BATCH, SEQ)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        return {
            "padded": _max_diff(padded, ref(ids, attention_mask=mask)),
            "padded_row_alone": _max_diff(padded[0, 5:], ref(ids[:1, 5:])[0]),
            "packed": _max_diff(
                model(ids, document_ids=docs, position_ids=pos), ref(ids, document_ids=docs, position_ids=pos)
            ),
        }


def scenarios(world: int) -> dict[str, Callable]:
    """Name -> scenario returning JSON-able numbers, on a 1-D mesh of all ranks; run in this order on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    table: dict[str, Callable] = {}
    for tied in (False, True):
        for sp in (True, False):
            table[f"forward-tied{int(tied)}-sp{int(sp)}"] = lambda t=tied, s=sp: _forward(mesh, t, s)
    for tied, sp, lp in (
        (False, True, False),
        (True, True, False),
        (False, False, False),
        (False, True, True),
        (True, True, True),
    ):
        table[f"train-tied{int(tied)}-sp{int(sp)}-lp{int(lp)}"] = lambda t=tied, s=sp, p=lp: _train(mesh, t, s, p)
    table["rejects"] = lambda: _rejects(mesh)
    for sp in (True, False):
        table[f"padded-sp{int(sp)}"] = lambda s=sp: _padded(mesh, s)
    return table


# ---- test side --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    """Every scenario's numbers, one dict per rank, from a single 2-process gloo run."""
    return spawn_gloo(TP, scenarios, tmp_path_factory.mktemp("tp"))


def _get(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank} failed in {name}:\n{res['error']}"
    return per_rank


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no-sp"])
def test_forward_matches_single_process(results, tied: bool, sp: bool) -> None:
    for res in _get(results, f"forward-tied{int(tied)}-sp{int(sp)}"):
        for key in ("logits", "logits_docs", "hidden", "return_hidden_then_logits"):
            assert res[key] < TOL, (key, res)
        assert res["state_dict_keys_same"], "TP must keep the checkpoint's parameter names"
        assert res["n_params"][0] == res["n_params"][1], res
        assert res["wq_local_rows"] == 64 // TP, res


@pytest.mark.parametrize(
    ("tied", "sp", "lp"),
    [(False, True, False), (True, True, False), (False, False, False), (False, True, True), (True, True, True)],
    ids=["untied-sp", "tied-sp", "untied-no-sp", "untied-sp-loss-parallel", "tied-sp-loss-parallel"],
)
def test_adamw_steps_match_single_process(results, tied: bool, sp: bool, lp: bool) -> None:
    for res in _get(results, f"train-tied{int(tied)}-sp{int(sp)}-lp{int(lp)}"):
        assert len(res["tp_losses"]) == STEPS
        assert res["loss"] < TOL, res
        assert res["weights"] < TOL, res
        # The comparison means something only if training moved the weights well beyond the tolerance.
        assert res["moved"] > 1e-3, res
        assert res["logits"] == ("(Shard(dim=2),)" if lp else "plain"), res


def test_rejects_inputs_the_layout_cannot_run(results) -> None:
    for res in _get(results, "rejects"):
        assert "not a multiple of tp=2" in res["odd_seq"], res
        assert "KV cache" in res["cache"], res


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no-sp"])
def test_padded_and_packed_batches_match_single_process(results, sp: bool) -> None:
    for res in _get(results, f"padded-sp{int(sp)}"):
        assert res["padded"] < TOL and res["packed"] < TOL, res
        assert res["padded_row_alone"] < TOL, res


def test_validate_tp_lists_valid_values() -> None:
    cfg = tiny_cfg(tied=False)
    validate_tp(cfg, 1)
    validate_tp(cfg, 2)
    message = r"tp=3 does not divide model\.n_heads=4; valid tp for this model: 1, 2"
    with pytest.raises(ValueError, match=message) as err:
        validate_tp(cfg, 3)
    assert "\n" not in str(err.value)
    smollm2 = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536)
    assert valid_tp_sizes(smollm2) == [1, 3]
    with pytest.raises(ValueError, match=r"model\.n_heads=9; valid tp for this model: 1, 3"):
        validate_tp(smollm2, 2)
