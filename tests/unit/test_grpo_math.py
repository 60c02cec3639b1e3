"""GRPO's arithmetic (`llmhpc.rl.grpo`) against small examples worked out by hand (numbers in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from llmhpc.rl.grpo import (
    clipped_policy_loss,
    fill_with_informative_groups,
    group_advantages,
    importance_ratio,
    informative,
    kl_k3,
    loss_sum_and_units,
    overlong_penalty,
)


def test_group_advantages_center_and_scale_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    # Group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57745 = +-0.86588.
    # Group 2: all equal -> 0. Group 3: mean 0.75, std sqrt((2.25^2 + 3 * 0.75^2) / 3) = 1.5 -> 1.49990, -0.49997.
    scaled = group_advantages(rewards)
    expected = torch.tensor([[0.86588, -0.86588, -0.86588, 0.86588], [0, 0, 0, 0],
                             [2.25 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001]])
    assert torch.allclose(scaled, expected, atol=1e-5)
    centered = group_advantages(rewards, scale=False)  # Dr. GRPO
    assert torch.allclose(centered, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [2.25, -0.75, -0.75, -0.75]]))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_clipped_loss_on_both_sides_of_the_clip_boundary():
    """Ratios 0.7, 0.9, 1.1, 1.5 with A = +1 and A = -1 (clip 0.2 / 0.28): values and gradients by hand."""
    old = torch.zeros(2, 4)
    logprobs = torch.tensor([[0.7, 0.9, 1.1, 1.5]] * 2).log().requires_grad_()
    ratio = importance_ratio(logprobs, old, torch.ones(2, 4))
    loss, low, high = clipped_policy_loss(ratio, torch.tensor([1.0, -1.0]), clip_low=0.2, clip_high=0.28)
    # A = +1: -min(rho, clip(rho, 0.8, 1.28)) = -0.7, -0.9, -1.1, -1.28 (only 1.5 is clipped: no gradient there).
    # A = -1: -min(-rho, -clip(rho)) = max(rho, clip(rho)) = 0.8 (0.7 clipped up: no gradient), 0.9, 1.1, 1.5.
    assert torch.allclose(loss, torch.tensor([[-0.7, -0.9, -1.1, -1.28], [0.8, 0.9, 1.1, 1.5]]))
    assert high.tolist() == [[False, False, False, True], [False] * 4]
    assert low.tolist() == [[False] * 4, [True, False, False, False]]
    loss.sum().backward()
    # d(-rho A)/d logp = -A rho where unclipped, 0 where clipped.
    expected = torch.tensor([[-0.7, -0.9, -1.1, 0.0], [0.0, 0.9, 1.1, 1.5]])
    assert torch.allclose(logprobs.grad, expected)


def test_sequence_level_ratio_is_the_length_normalized_one_of_gspo():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    logprobs = torch.tensor([[-0.5, -2.5, -2.0], [-0.9, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ratio = importance_ratio(logprobs, old, mask, level="sequence")
    # Row 1: mean(0.5, -0.5, 1.0) = 1/3 -> e^(1/3) on every token. Row 2: the masked token is left out:
    # mean(0.1, 0.0) = 0.05 -> e^0.05.
    assert torch.allclose(ratio[0], torch.full((3,), math.exp(1 / 3)))
    assert torch.allclose(ratio[1], torch.full((3,), math.exp(0.05)))
    assert torch.allclose(importance_ratio(logprobs, old, mask), (logprobs - old).exp())


def test_k3_kl_by_hand_and_never_negative():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-0.5, -2.0, -1.5]])
    # d = ref - logp = 0.5, 0, -1: e^0.5 - 1.5 = 0.148721, 0, e^-1 + 1 - 1 = 0.367879.
    assert torch.allclose(kl_k3(logprobs, ref), torch.tensor([[0.148721, 0.0, 0.367879]]), atol=1e-6)
    many = torch.randn(1000)
    assert bool((kl_k3(many, torch.randn(1000)) >= 0).all())


def test_loss_normalizations_of_grpo_dapo_and_dr_grpo():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # GRPO: token means 2 and 4, summed over 2 completions -> 6 / 2 = 3.
    assert loss_sum_and_units(per_token, mask, "sequence", 4) == (torch.tensor(6.0), 2)
    # DAPO: (1 + 2 + 3 + 4) over 4 tokens = 2.5.
    assert loss_sum_and_units(per_token, mask, "token", 4) == (torch.tensor(10.0), 4)
    # Dr. GRPO: 10 over 2 completions x 4 max tokens = 1.25, whatever the lengths.
    assert loss_sum_and_units(per_token, mask, "fixed", 4) == (torch.tensor(10.0), 8)
    with pytest.raises(ValueError, match="choose from"):
        loss_sum_and_units(per_token, mask, "mean", 4)
    # A completion with every token masked (overlong masking) is no unit of GRPO's mean over completions.
    masked = torch.cat([mask, torch.zeros(1, 4, dtype=mask.dtype)])
    padded = torch.cat([per_token, torch.ones(1, 4)])
    assert loss_sum_and_units(padded, masked, "sequence", 4) == (torch.tensor(6.0), 2)


def test_overlong_penalty_is_dapos_linear_ramp():
    lengths = torch.tensor([10, 12, 13, 14, 16])  # max 16 tokens, a buffer of 4: the ramp starts after 12
    expected = torch.tensor([0, 0, -0.25, -0.5, -1.0], dtype=torch.float64)
    assert torch.allclose(overlong_penalty(lengths, 16, 4), expected)
    assert bool((overlong_penalty(lengths, 16, 0) == 0).all())


def test_dynamic_sampling_never_keeps_an_all_equal_group():
    """Draws of 3 groups of 4, a third of them all-equal: the batch fills with informative groups only, in draw
    order, drawing again for the missing ones; when draws run out it says how many it got."""
    generator = torch.Generator().manual_seed(0)
    counter = iter(range(1000))

    def draw(n: int):
        ids = [next(counter) for _ in range(n)]
        rewards = torch.randint(0, 2, (n, 4), generator=generator).float()
        rewards[[i % 3 == 0 for i in ids]] = 1.0  # every third group all right
        return ids, rewards

    kept, rewards, stats = fill_with_informative_groups(draw, groups=8, max_draws=20)
    assert len(kept) == 8 and rewards.shape == (8, 4) and kept == sorted(kept)
    assert bool(informative(rewards).all()) and all(i % 3 for i in kept)
    assert stats["drawn"] == stats["dropped"] + 8 and stats["draws"] > 1
    assert (group_advantages(rewards).abs().sum(dim=1) > 0).all()
    few, _, short = fill_with_informative_groups(lambda n: (list(range(n)), torch.ones(n, 4)), groups=4, max_draws=3)
    assert few == [] and short == {"drawn": 12, "dropped": 12, "draws": 3}


@pytest.mark.parametrize(("norm", "level", "temperature"), [("token", "token", 1.0), ("sequence", "token", 1.0),
                                                            ("fixed", "token", 0.7), ("sequence", "sequence", 1.3)])
def test_grpo_objective_equals_the_formula_written_out_on_full_logits(norm: str, level: str, temperature: float):
    """The objective (chunked log-probs through the head, on completion positions only) against the same loss
    spelled out token by token from the model's full logits divided by the sampling temperature: value and
    gradient, for each normalization and both importance levels."""
    from llmhpc.config.schema import ModelConfig
    from llmhpc.models import build_model
    from llmhpc.rl.grpo import GRPOObjective
    from llmhpc.train.losses import IGNORE_INDEX

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=32))
    ids = torch.randint(0, 64, (4, 12))
    labels = torch.full_like(ids, IGNORE_INDEX)
    ends = [11, 9, 8, 6]  # completions of 7, 5, 4 and 2 tokens after a 4-token prompt
    for row, end in enumerate(ends):
        labels[row, 3:end] = ids[row, 4 : end + 1]
    mask = labels != IGNORE_INDEX
    with torch.no_grad():
        now = (model(ids) / temperature).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    shift = torch.randn(4, 12, generator=torch.Generator().manual_seed(1)) * 0.3  # ratios on both sides of the clip
    batch = {"input_ids": ids, "labels": labels, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
             "old_logprobs": torch.where(mask, now + shift, 0.0), "ref_logprobs": torch.where(mask, now - shift, 0.0)}
    objective = GRPOObjective(clip_low=0.2, clip_high=0.28, beta=0.05, loss_norm=norm, importance=level,
                              max_completion_tokens=8, temperature=temperature)
    out = objective(model, batch)
    (out.loss / out.count).backward()
    ours_grad = model.layers["0"].attention.wq.weight.grad.clone()
    model.zero_grad()

    logp = (model(ids) / temperature).log_softmax(-1)
    per_row = []
    for row in range(4):
        terms = []
        positions = mask[row].nonzero().flatten().tolist()
        deltas = [logp[row, t, labels[row, t]] - batch["old_logprobs"][row, t] for t in positions]
        seq_ratio = torch.stack(deltas).mean().exp()
        adv = batch["advantages"][row]
        for t, delta in zip(positions, deltas, strict=True):
            ratio = seq_ratio if level == "sequence" else delta.exp()
            surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
            d = batch["ref_logprobs"][row, t] - logp[row, t, labels[row, t]]
            terms.append(-surrogate + 0.05 * (d.exp() - d - 1))
        per_row.append(torch.stack(terms))
    if norm == "sequence":
        expected = torch.stack([r.mean() for r in per_row]).mean()
    elif norm == "token":
        expected = torch.cat(per_row).sum() / sum(len(r) for r in per_row)
    else:
        expected = torch.cat(per_row).sum() / (4 * 8)
    expected.backward()
    assert abs((out.loss / out.count).item() - expected.item()) <= 1e-5
    assert torch.allclose(ours_grad, model.layers["0"].attention.wq.weight.grad, atol=1e-5)
    clipped = out.metrics["clip_low"][0] + out.metrics["clip_high"][0]
    assert out.metrics["clip_low"][1] == mask.sum() and (level == "sequence" or clipped > 0)
