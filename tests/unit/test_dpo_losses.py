"""DPO (`llmhpc.rl.dpo`) and preference data (`llmhpc.data.preference`): every loss variant against numbers worked
out by hand, the objective's loss and gradients on a tiny model against an independent full-logits computation,
the cached reference against a fresh one, and the pair reader's handling of every row layout and malformed row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.data.arithmetic import parse_final_answer, train_eval_split
from llmhpc.data.arithmetic_preferences import preference_rows, sampled_pair_rows
from llmhpc.data.preference import PairLoader, load_preference_pairs, pair_batch, pairs_digest
from llmhpc.data.tokenizer import load_tokenizer
from llmhpc.errors import InputError
from llmhpc.models import build_model
from llmhpc.rl.dpo import (
    DPOObjective,
    load_cached_reference,
    preference_losses,
    reference_key,
    reference_logprobs,
    save_cached_reference,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Two pairs. Summed log-probs: policy chosen -10, -4; rejected -12, -3; reference chosen -11, -4; rejected -11,
# -4. Answer lengths: chosen 5, 2; rejected 4, 3. So h = (pi_c - ref_c) - (pi_r - ref_r) = (1) - (-1) = 2 for pair
# 1 and (0) - (1) = -1 for pair 2.
PI_C, PI_R = torch.tensor([-10.0, -4.0], dtype=torch.float64), torch.tensor([-12.0, -3.0], dtype=torch.float64)
REF_C, REF_R = torch.tensor([-11.0, -4.0], dtype=torch.float64), torch.tensor([-11.0, -4.0], dtype=torch.float64)
N_C, N_R = torch.tensor([5.0, 2.0], dtype=torch.float64), torch.tensor([4.0, 3.0], dtype=torch.float64)


def _losses(**options):
    return preference_losses(PI_C, PI_R, REF_C, REF_R, N_C, N_R, **options)


def test_sigmoid_loss_and_rewards_by_hand():
    losses, reward_c, reward_r = _losses(loss="sigmoid", beta=0.5)
    # beta h = 1 and -0.5: -log sigmoid(1) = 0.313262, -log sigmoid(-0.5) = 0.974077.
    assert torch.allclose(losses, torch.tensor([0.313262, 0.974077], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(reward_c, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(reward_r, torch.tensor([-0.5, 0.5], dtype=torch.float64))
    smoothed, _, _ = _losses(loss="sigmoid", beta=0.5, label_smoothing=0.1)
    # 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262.
    assert smoothed[0].item() == pytest.approx(0.9 * -math.log(_sigmoid(1)) + 0.1 * -math.log(_sigmoid(-1)))
    assert smoothed[0].item() == pytest.approx(0.413262, abs=1e-6)


def test_ipo_uses_per_token_means():
    losses, reward_c, _ = _losses(loss="ipo", beta=0.25)
    # Pair 1: h' = (1/5) - (-1/4) = 0.45; target 1 / (2 * 0.25) = 2; (0.45 - 2)^2 = 2.4025.
    # Pair 2: h' = 0/2 - 1/3 = -0.333333; (-0.333333 - 2)^2 = 5.444444.
    assert torch.allclose(losses, torch.tensor([2.4025, 49 / 9], dtype=torch.float64), atol=1e-9)
    assert reward_c[0].item() == pytest.approx(0.25 * 1 / 5)


def test_hinge_loss_by_hand():
    losses, _, _ = _losses(loss="hinge", beta=0.4)
    # 1 - 0.4 * 2 = 0.2; 1 - 0.4 * -1 = 1.4.
    assert torch.allclose(losses, torch.tensor([0.2, 1.4], dtype=torch.float64))
    losses, _, _ = _losses(loss="hinge", beta=1.0)
    assert losses[0].item() == 0.0  # past the margin: no loss


def test_simpo_is_reference_free_and_length_normalized():
    losses, reward_c, reward_r = _losses(loss="simpo", beta=2.0, simpo_gamma=0.5)
    # Means: chosen -2, -2; rejected -3, -1. z = 2 * (-2 + 3) - 0.5 = 1.5 and 2 * (-2 + 1) - 0.5 = -2.5.
    assert torch.allclose(losses, torch.tensor([-math.log(_sigmoid(1.5)), -math.log(_sigmoid(-2.5))],
                                               dtype=torch.float64))
    assert torch.allclose(reward_c, torch.tensor([-4.0, -4.0], dtype=torch.float64))
    assert torch.allclose(reward_r, torch.tensor([-6.0, -2.0], dtype=torch.float64))
    moved = preference_losses(PI_C, PI_R, REF_C + 7, REF_R - 3, N_C, N_R, loss="simpo", beta=2.0, simpo_gamma=0.5)
    assert torch.equal(moved[0], losses)  # the reference plays no part
    with pytest.raises(ValueError, match="choose from"):
        _losses(loss="kto")


# ---- the objective on a tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def pairs(tokenizer, tmp_path_factory):
    rows = preference_rows(train_eval_split(10, 0, seed=3)[0], seed=3)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    found, report = load_preference_pairs(path, tokenizer, 256)
    assert report.kept == 10 and not report.skipped
    return found


def _tiny(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                   max_seq_len=256))


def _independent_sums(model, pair_list) -> torch.Tensor:
    """[N, 2] answer log-prob sums, each side alone (no padding, no batching), from the full logits."""
    out = []
    for pair in pair_list:
        sums = []
        for side in (pair.chosen, pair.rejected):
            tokens = torch.from_numpy(side.tokens)
            logp = torch.log_softmax(model(tokens[None, :-1]).float()[0], -1)
            picked = logp.gather(-1, tokens[1:, None])[:, 0]
            sums.append(picked[torch.from_numpy(side.answer[1:])].sum())
        out.append(torch.stack(sums))
    return torch.stack(out)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "simpo"])
def test_objective_loss_and_gradients_match_an_independent_computation(loss, pairs, tokenizer):
    model = _tiny(len(tokenizer))
    chunk = pairs[:4]
    reference = torch.randn(4, 2, dtype=torch.float64) * 0.5 + _independent_sums(model, chunk).detach().double()
    batch = pair_batch(chunk, pad_id=0)
    batch["ref_logps"] = reference
    objective = DPOObjective(loss=loss, beta=0.3, label_smoothing=0.1 if loss in ("sigmoid", "simpo") else 0.0)
    out = objective(model, batch)
    assert out.count == 4
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    sums = _independent_sums(model, chunk)
    lengths = torch.tensor([[p.chosen.n_labels, p.rejected.n_labels] for p in chunk], dtype=torch.float64)
    beta, eps = 0.3, objective.options["label_smoothing"]
    pc, pr = sums[:, 0].double(), sums[:, 1].double()
    rc, rr = reference[:, 0], reference[:, 1]
    if loss == "sigmoid":
        z = beta * ((pc - rc) - (pr - rr))
        expected = -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
    elif loss == "ipo":
        h = (pc - rc) / lengths[:, 0] - (pr - rr) / lengths[:, 1]
        expected = (h - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        expected = torch.clamp(1 - beta * ((pc - rc) - (pr - rr)), min=0)
    else:
        z = beta * (pc / lengths[:, 0] - pr / lengths[:, 1]) - 0.5
        expected = -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
    expected.sum().backward()
    assert out.loss.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert (ours[name] - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-9, name
    accuracy, count = out.metrics["reward_accuracy"]
    assert 0 <= accuracy.item() <= count.item() == 4
    if loss == "simpo":  # reference-free: a batch without reference log-probs gives the same loss
        del batch["ref_logps"]
        assert objective(model, batch).loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_cached_reference_equals_a_fresh_one(pairs, tokenizer, tmp_path):
    model = _tiny(len(tokenizer), seed=1).eval()
    fresh = _independent_sums(model, pairs).double()
    computed = reference_logprobs(model, pairs, pairs_per_batch=3, pad_id=0, device=torch.device("cpu"))
    assert computed.shape == (len(pairs), 2) and computed.dtype == torch.float64
    assert torch.allclose(computed, fresh.detach(), rtol=1e-5, atol=1e-4)
    key = reference_key({"sha256": "abc"}, pairs_digest(pairs), "fp32")
    path = tmp_path / ".pairs.jsonl.reference.safetensors"
    save_cached_reference(path, key, computed)
    assert torch.equal(load_cached_reference(path, key, len(pairs)), computed)
    other = reference_key({"sha256": "abd"}, pairs_digest(pairs), "fp32")
    assert load_cached_reference(path, other, len(pairs)) is None  # other starting weights: recompute
    assert load_cached_reference(path, key, len(pairs) + 1) is None
    assert pairs_digest(pairs) != pairs_digest(pairs[:-1])


def test_pair_loader_resumes_and_splits_ranks(pairs):
    reference = torch.arange(len(pairs) * 2, dtype=torch.float64).view(-1, 2)
    loader = PairLoader(pairs, 2, seed=0, pad_id=0, reference=reference)
    [loader.next_batch() for _ in range(3)]
    state = loader.state_dict()
    ahead = [loader.next_batch() for _ in range(4)]  # crosses into the next epoch (5 micro-batches per epoch)
    again = PairLoader(pairs, 2, seed=0, pad_id=0, reference=reference)
    again.load_state_dict(state)
    for a, b in zip(ahead, [again.next_batch() for _ in range(4)], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # The reference rows follow their pairs: each batch's first chosen row is the pair whose reference it carries.
    first = ahead[0]
    index = int(first["ref_logps"][0, 0].item()) // 2
    assert torch.equal(first["input_ids"][0, : len(pairs[index].chosen.tokens) - 1],
                       torch.from_numpy(pairs[index].chosen.tokens[:-1]))
    ranks = [PairLoader(pairs, 1, seed=0, pad_id=0, dp_rank=r, dp_size=2, reference=reference) for r in (0, 1)]
    seen = [{int(ranks[r].next_batch()["ref_logps"][0, 0]) for _ in range(5)} for r in (0, 1)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10
    with pytest.raises(InputError, match="cannot fill one micro-batch"):
        PairLoader(pairs, 6, seed=0, pad_id=0, dp_size=2)


# ---- reading pairs ----------------------------------------------------------------------------------------------


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_row_layout_gives_the_same_tokens(tokenizer, tmp_path):
    question, good, bad = "What is 2 plus 3?", "2 + 3 = 5.\nThe answer is 5.", "2 + 3 = 6.\nThe answer is 6."
    user, system = {"role": "user", "content": question}, {"role": "system", "content": "Be brief."}
    rows = [
        {"prompt": question, "chosen": good, "rejected": bad},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},
        {"chosen": [user, {"role": "assistant", "content": good}],  # implicit prompt (HH-RLHF)
         "rejected": [user, {"role": "assistant", "content": bad}]},
        {"prompt": [system, user], "chosen": good, "rejected": bad},
    ]
    found, report = load_preference_pairs(_write(tmp_path / "p.jsonl", rows), tokenizer, 128)
    assert report.kept == 4
    for pair in found[1:3]:
        assert (pair.chosen.tokens == found[0].chosen.tokens).all()
        assert (pair.rejected.answer == found[0].rejected.answer).all()
    assert "Be brief." in tokenizer.decode(found[3].chosen.tokens)  # a system turn is part of the prompt
    # Only the answer carries the loss: its tokens decode to the answer and the end-of-turn marker.
    side = found[0].chosen
    assert tokenizer.decode(side.tokens[side.answer]) == good + "<|im_end|>"
    batch = pair_batch(found[:2], pad_id=0)
    assert batch["input_ids"].shape[0] == 4
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(labelled) == good + "<|im_end|>"


def test_malformed_rows_are_reported_with_file_and_line(tokenizer, tmp_path):
    ok = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    rows = [ok, "{not json", {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
            {"prompt": "Hi?", "chosen": "Hello."},
            {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
             "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
            {"prompt": "Hi?", "chosen": "Hello. " * 200, "rejected": "No."}]
    path = _write(tmp_path / "pairs.jsonl", rows)
    found, report = load_preference_pairs(path, tokenizer, 64)
    assert len(found) == 1
    assert dict(report.skipped) == {"bad_json": 1, "same_pair": 1, "no_pair": 2, "too_long": 1}
    assert report.problems[0].startswith(f"{path}, line 2:")
    assert "preference data: 6 rows, 1 pairs, 5 skipped" in report.summary()
    with pytest.raises(InputError, match=rf"{path.name}, line 2: .*data.on_error=skip"):
        load_preference_pairs(path, tokenizer, 64, on_error="fail")
    with pytest.raises(InputError, match="preference data not found"):
        load_preference_pairs(tmp_path / "missing.jsonl", tokenizer, 64)


def test_arithmetic_pairs_rank_a_right_answer_above_a_wrong_one():
    train, held = train_eval_split(300, 100, seed=0)
    rows = preference_rows(train, seed=0)
    assert {r["flaw"] for r in rows} == {"wrong_result", "no_answer"}
    for row, problem in zip(rows, train, strict=True):
        assert parse_final_answer(row["chosen"]) == problem.answer != parse_final_answer(row["rejected"])
        assert row["chosen"] != row["rejected"]
    assert not {r["prompt"] for r in rows} & {p.question for p in held}  # disjoint splits
    assert preference_rows(train, seed=0) == rows


def test_sampled_pairs_rank_each_distinct_wrong_answer_below_a_right_one():
    a, b, c = train_eval_split(3, 10, seed=0)[0]
    def right(p):
        return f"so {p.answer}"

    def wrong(p, k):
        return f"so {int(p.answer) + k}"
    samples = [[wrong(a, 1), right(a), wrong(a, 1), wrong(a, 2), right(a) + ".", ""],  # two right, two wrong + ""
               [wrong(b, 5), wrong(b, 5)],                                               # none right
               [right(c), right(c)]]                                                     # all right: no pair
    rows = sampled_pair_rows([a, b, c], samples, lambda p, text: text.split()[-1:] == [p.answer]
                             or text.split()[-1:] == [p.answer + "."])
    assert [(r["prompt"], r["chosen"], r["rejected"], r["flaw"]) for r in rows] == [
        (a.question, right(a), wrong(a, 1), "sampled"),
        (a.question, right(a) + ".", wrong(a, 2), "sampled"),   # the right answers taken in turn
        (a.question, right(a), "", "sampled"),
        (b.question, b.solution, wrong(b, 5), "sampled_none_right"),  # the worked solution stands in, once
    ]
    assert all(r["answer"] == p.answer for r, p in zip(rows, [a, a, a, b], strict=True))
    with pytest.raises(ValueError, match="3 problems need as many sample lists"):
        sampled_pair_rows([a, b, c], samples[:2], lambda p, text: False)
