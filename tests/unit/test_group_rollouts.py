"""GRPO's batch source on a tiny random model: rows line up with what was sampled, old log-probs are the
training forward's, sampling does not depend on the number of ranks, dynamic sampling keeps only informative
groups, overlong answers are masked or penalized, and the state resumes bitwise."""

from __future__ import annotations

import json

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.models import build_model
from llmhpc.rl.group_rollouts import GroupRollouts, GroupSettings, Prompt
from llmhpc.rl.grpo import completion_logprobs, group_advantages
from llmhpc.rl.rewards import RewardSet
from llmhpc.rl.rollout import RolloutEngine
from llmhpc.rl.sampling import SamplingParams
from llmhpc.train.losses import IGNORE_INDEX
from llmhpc.train.objective import LMHead

G = 4


def first_token_parity(completion: str, example: dict) -> float:
    """1 for an answer whose first token id is even; a prompt marked 'fixed' always gets 1 (an all-equal group)."""
    return 1.0 if example.get("fixed") else float(int(completion.split()[0]) % 2 == 0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                   max_seq_len=64)).eval()


def _prompts(n: int = 12, fixed: set[int] = frozenset()) -> list[Prompt]:
    gen = torch.Generator().manual_seed(3)
    return [Prompt(tuple(torch.randint(1, 50, (3 + i % 4,), generator=gen).tolist()),
                   {"answer": str(i), "fixed": i in fixed}) for i in range(n)]


def _source(model, prompts, *, groups=2, micro_batches=2, rank=0, ranks=1, eos=(), **settings) -> GroupRollouts:
    params = SamplingParams(max_new_tokens=settings.pop("max_new_tokens", 6), temperature=1.0, seed=11)
    rewards = RewardSet({"parity": first_token_parity}, {"parity": 1.0})
    engine = RolloutEngine(model, batch_size=8, eos_token_ids=eos)
    return GroupRollouts(engine, prompts, rewards, lambda ids: " ".join(map(str, ids)),
                         GroupSettings(group_size=G, sampling=params, groups=groups, micro_batches=micro_batches,
                                       **settings), seed=5, rank=rank, ranks=ranks)


def _rows(batches) -> list[tuple[tuple[int, ...], tuple[int, ...], float]]:
    """(input ids without padding, answer tokens, advantage) of every row."""
    rows = []
    for b in batches:
        for ids, labels, adv in zip(b["input_ids"], b["labels"], b["advantages"], strict=True):
            answer = labels[labels != IGNORE_INDEX]
            start = int((labels != IGNORE_INDEX).nonzero()[0]) if len(answer) else 0
            rows.append((tuple(ids[: start + len(answer)].tolist()), tuple(answer.tolist()), float(adv)))
    return rows


def test_rows_hold_the_sampled_answers_with_the_training_forwards_logprobs(model):
    source = _source(model, _prompts(), skip_zero_advantage=False)
    batches = [source.next_batch(), source.next_batch()]
    assert sum(len(b["input_ids"]) for b in batches) == 2 * G
    for b in batches:
        labels = b["labels"]
        mask = labels != IGNORE_INDEX
        # The label at position p is the input at p + 1 (the answer follows its prompt in the row).
        assert torch.equal(labels[:, :-1][mask[:, :-1]], b["input_ids"][:, 1:][mask[:, :-1]])
        with torch.no_grad():
            hidden = model(b["input_ids"], return_hidden=True)
            trained = completion_logprobs(LMHead(model), hidden, labels, 1.0)
        assert (trained - b["old_logprobs"]).abs().max() <= 1e-5
        assert bool((b["old_logprobs"][~mask] == 0).all())
    # Advantages: each group's rewards, centered and scaled, row by row.
    by_prompt: dict[tuple, list[tuple[float, float]]] = {}
    for ids, answer, adv in _rows(batches):
        prompt = ids[: len(ids) - len(answer) + 1]
        by_prompt.setdefault(prompt, []).append((float(answer[0] % 2 == 0), adv))
    assert len(by_prompt) == 2 and all(len(v) == G for v in by_prompt.values())
    for pairs in by_prompt.values():
        rewards = torch.tensor([[r for r, _ in pairs]])
        assert torch.allclose(group_advantages(rewards)[0], torch.tensor([a for _, a in pairs]), atol=1e-6)
    assert source.metrics()["reward"] == pytest.approx(
        sum(r for v in by_prompt.values() for r, _ in v) / (2 * G))


def test_two_ranks_sample_what_one_rank_samples(model):
    prompts = _prompts()
    one = _source(model, prompts, groups=4, micro_batches=1, skip_zero_advantage=False)
    halves = [_source(model, prompts, groups=2, micro_batches=1, rank=r, ranks=2, skip_zero_advantage=False)
              for r in range(2)]
    alone = sorted(_rows([one.next_batch()]))
    together = sorted(_rows([halves[0].next_batch()]) + _rows([halves[1].next_batch()]))
    assert [r[:2] for r in alone] == [r[:2] for r in together]


def test_dynamic_sampling_trains_only_informative_groups(model):
    fixed = set(range(0, 12, 2))  # every other prompt always scores 1: its group teaches nothing
    source = _source(model, _prompts(fixed=fixed), groups=3, micro_batches=1, dynamic_sampling=True, max_draws=8)
    for _ in range(3):
        rows = _rows([source.next_batch()])
        assert len(rows) == 3 * G and all(adv != 0 for _, _, adv in rows)
        prompts = {ids[: len(ids) - len(answer) + 1] for ids, answer, _ in rows}
        assert not prompts & {p.ids for i, p in enumerate(_prompts()) if i in fixed}
    assert source.metrics()["dynamic_dropped"] > 0


def test_overlong_answers_are_masked_or_penalized(model):
    eos = [7, 8, 9, 10, 11]  # some answers end early, the rest hit max_new_tokens
    keep = {"skip_zero_advantage": False}
    masked = _source(model, _prompts(), groups=2, micro_batches=1, eos=eos, overlong="mask", **keep).next_batch()
    plain = _source(model, _prompts(), groups=2, micro_batches=1, eos=eos, **keep).next_batch()
    assert torch.equal(masked["input_ids"], plain["input_ids"])
    lengths = (plain["labels"] != IGNORE_INDEX).sum(dim=1)
    cut = lengths == 6
    assert 0 < int(cut.sum()) < len(cut)
    assert bool((masked["labels"][cut] == IGNORE_INDEX).all())
    assert torch.equal(masked["labels"][~cut], plain["labels"][~cut])
    penalized = _source(model, _prompts(), groups=2, micro_batches=1, eos=eos, overlong="penalty",
                        overlong_buffer=2)
    penalized.next_batch()
    plain_source = _source(model, _prompts(), groups=2, micro_batches=1, eos=eos)
    plain_source.next_batch()
    # Answers of 5 tokens lose 0.5 and of 6 lose 1: the mean reward drops by their share.
    expected_drop = (0.5 * float((lengths == 5).sum()) + float(cut.sum())) / len(lengths)
    assert plain_source.metrics()["reward"] - penalized.metrics()["reward"] == pytest.approx(expected_drop)


@pytest.mark.parametrize("norm", ["token", "sequence", "fixed"])
def test_leaving_out_zero_advantage_answers_leaves_the_step_unchanged(model, norm):
    """Groups whose rewards are all equal have advantages 0: without a KL term their answers add exactly 0 to the
    loss and its gradient, so they are not computed, but they stay units of the normalization."""
    from llmhpc.rl.grpo import GRPOObjective

    objective = GRPOObjective(loss_norm=norm, max_completion_tokens=6)
    prompts = _prompts(fixed={0, 3, 5, 6})
    results = []
    for skip in (False, True):
        source = _source(model, prompts, groups=4, micro_batches=2, skip_zero_advantage=skip, eos=[7, 8, 9])
        batches = [source.next_batch(), source.next_batch()]
        normalizer = sum(objective.normalizer(b) for b in batches)
        model.zero_grad()
        loss = sum(objective(model, b).loss for b in batches) / normalizer
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((sum(len(b["input_ids"]) for b in batches), normalizer, float(loss), grads))
    model.zero_grad()
    (rows, units, loss, grads), (lean_rows, lean_units, lean_loss, lean_grads) = results
    assert lean_rows < rows and lean_units == units
    assert lean_loss == pytest.approx(loss, abs=1e-7) and loss != 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, lean_grads, strict=True))


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_state_resumes_mid_rollout_and_after_it_bitwise(model, shared_prompt):
    """Also with a prompt's answers in one row, whose [S, S] attention mask the state leaves out and rebuilds."""
    source = _source(model, _prompts(), updates=2, shared_prompt=shared_prompt)
    source.next_batch()
    source.next_batch()
    source.next_batch()  # one of the two micro-batches of the second update of rollout 1
    state = json.loads(json.dumps(source.state_dict()))  # what a checkpoint's meta.json keeps
    assert all(("segment" in b) == shared_prompt and "attention_mask" not in b for b in state["batches"])
    rest = [source.next_batch() for _ in range(4)]  # the rest of rollout 1, then rollout 2
    resumed = _source(model, _prompts(), updates=2, shared_prompt=shared_prompt)
    resumed.load_state_dict(state)
    again = [resumed.next_batch() for _ in range(4)]
    for a, b in zip(rest, again, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics()["rollout"] == 2


def test_one_row_per_prompt_trains_exactly_what_a_row_per_answer_trains(model):
    """grpo.shared_prompt: the same rollout cut into one row per prompt (a group split across the two micro-batches
    included, overlong answers masked) gives the training forward's old log-probs at the labels, and the loss and
    every gradient of a row per answer, for fewer input tokens."""
    from llmhpc.rl.grpo import GRPOObjective
    from llmhpc.train.objective import model_inputs

    settings = {"groups": 3, "micro_batches": 2, "eos": [7, 8, 9, 10, 11], "overlong": "mask",
                "skip_zero_advantage": False}
    shared = _source(model, _prompts(), shared_prompt=True, **settings)
    plain = _source(model, _prompts(), **settings)
    shared_batches, plain_batches = [shared.next_batch(), shared.next_batch()], [plain.next_batch(),
                                                                                   plain.next_batch()]
    assert sum(len(b["input_ids"]) for b in shared_batches) == 4  # 3 prompts, one cut between the micro-batches
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in shared_batches) == sum(
        int((b["labels"] != IGNORE_INDEX).sum()) for b in plain_batches)
    objective = GRPOObjective(clip_low=0.2, clip_high=0.28)

    def loss_and_grads(batches):
        model.zero_grad()
        total = 0.0
        for b in batches:
            mask = b["labels"] != IGNORE_INDEX  # ratios of 1 to e^0.4 (some clipped), token by token
            b = {**b, "old_logprobs": b["old_logprobs"] - 0.1 * (b["labels"] % 5) * mask}
            out = objective(model, b)
            out.loss.backward()
            total += float(out.loss)
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for b in shared_batches:
        labels = b["labels"]
        with torch.no_grad():
            hidden = model(**model_inputs(b), return_hidden=True)
            trained = completion_logprobs(LMHead(model), hidden, labels, 1.0)
        assert (trained - b["old_logprobs"]).abs().max() <= 1e-5
    model.train()
    try:
        shared_loss, shared_grads = loss_and_grads(shared_batches)
        plain_loss, plain_grads = loss_and_grads(plain_batches)
    finally:
        model.eval().zero_grad()
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5, abs=1e-7) and plain_loss != 0
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert (shared_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-8, name
    assert sum(b["input_ids"].numel() for b in shared_batches) < sum(b["input_ids"].numel() for b in plain_batches)
