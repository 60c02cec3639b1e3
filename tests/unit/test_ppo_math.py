"""PPO's arithmetic (`llmhpc.rl.ppo`, and GRPO's clipped policy loss with per-token advantages): GAE against a
plain per-row loop and a Monte-Carlo return worked out by hand, the KL-penalized token rewards, whitening, both
clipped losses on each side of their clip boundaries (values and gradients), and the KL controllers."""

from __future__ import annotations

import pytest
import torch

from llmhpc.rl.grpo import clipped_policy_loss
from llmhpc.rl.ppo import KLController, answer_ends, clipped_value_loss, gae, token_rewards, whiten


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """Textbook GAE of one episode, written out: deltas first, then the discounted sum of the deltas ahead."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_plain_loop_per_row(gamma, lam):
    torch.manual_seed(0)
    lengths = [5, 1, 3, 7]
    rewards, values = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        want_a, want_r = _gae_reference(rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, lam)
        assert advantages[row, :n].tolist() == pytest.approx(want_a, abs=1e-12)
        assert returns[row, :n].tolist() == pytest.approx(want_r, abs=1e-12)
        assert not advantages[row, n:].any() and not returns[row, n:].any()  # padding stays out


def test_gae_by_hand():
    # gamma = lambda = 1: the advantage is the reward still to come minus the value, the return is that reward.
    rewards, values = torch.tensor([[0.0, -0.1, 1.0]]), torch.tensor([[0.5, 0.2, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert returns.tolist()[0] == pytest.approx([0.9, 0.9, 1.0])
    assert advantages.tolist()[0] == pytest.approx([0.4, 0.7, 0.3])
    # lambda = 0: one-step TD errors r_t + V_{t+1} - V_t.
    advantages, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.0)
    assert advantages.tolist()[0] == pytest.approx([-0.3, 0.4, 0.3])


def test_token_rewards_put_the_score_on_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.5, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [-0.5, 0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [0.05 - 1.0, 0.0, 0.0, 0.0]]))


def test_answers_back_to_back_in_one_row_get_the_rewards_and_gae_of_rows_of_their_own():
    """Shared-prompt rows: a prompt of 2 tokens (unmasked) then answers of 3 and 2 tokens whose positions both
    start after the prompt. Each answer gets its own score on its last token, and GAE runs within each answer
    (nothing of the second flows back into the first), as in a row per answer."""
    torch.manual_seed(1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 0]])
    ends = answer_ends(mask, positions)
    assert ends.tolist() == [[False, False, False, False, True, False, True, False]]
    assert answer_ends(mask).tolist() == [[False] * 6 + [True, False]]  # one answer without the positions
    logprobs, ref, values = torch.randn(3, 1, 8, dtype=torch.float64)
    scores = torch.tensor([[0.0, 0.0, 2.0, 2.0, 2.0, -1.0, -1.0, 0.0]], dtype=torch.float64)  # per token
    rewards, kl = token_rewards(scores, logprobs, ref, mask, kl_coef=0.1, ends=ends)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8, ends=ends)
    for span, score in ((slice(2, 5), 2.0), (slice(5, 7), -1.0)):  # each answer as a row of its own
        own_rewards, own_kl = token_rewards(torch.tensor([score], dtype=torch.float64), logprobs[:, span],
                                            ref[:, span], torch.ones(1, span.stop - span.start), kl_coef=0.1)
        assert torch.allclose(rewards[:, span], own_rewards) and torch.allclose(kl[:, span], own_kl)
        own_advantages, own_returns = gae(own_rewards, values[:, span], torch.ones(1, span.stop - span.start),
                                          gamma=0.9, lam=0.8)
        assert torch.allclose(advantages[:, span], own_advantages) and torch.allclose(returns[:, span], own_returns)
    # read as one answer, the first would bootstrap from the second: the check above can fail
    joined, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert not torch.allclose(joined[:, 2:5], advantages[:, 2:5])


def test_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = whiten(values, mask)
    kept = out[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6) and kept.std().item() == pytest.approx(1.0, rel=1e-5)
    assert out[0, 3] == 0 and out[1, 2:].eq(0).all()
    unshifted = whiten(values, mask, shift_mean=False)[mask.bool()]
    assert unshifted.mean().item() == pytest.approx(3.0, rel=1e-6)


def _value_case(value: float) -> tuple[float, float, bool]:
    v = torch.tensor([[value]], requires_grad=True)
    loss, clipped = clipped_value_loss(v, torch.tensor([[0.0]]), torch.tensor([[1.0]]), clip=0.2)
    loss.sum().backward()
    return loss.item(), v.grad.item(), bool(clipped.item())


def test_value_loss_on_both_sides_of_the_clip():
    # V_old = 0, return 1, clip 0.2. Inside the band: the plain squared error and its gradient V - R.
    assert _value_case(0.1) == pytest.approx((0.5 * 0.81, -0.9, False))
    # Past the band toward the return: the clipped value (0.2) is the worse fit, so it is the loss, no gradient.
    assert _value_case(0.5) == pytest.approx((0.5 * 0.64, 0.0, True))
    assert _value_case(1.5) == pytest.approx((0.5 * 0.64, 0.0, True))
    # Past the band away from the return: the plain error is the larger and its gradient pulls V back.
    assert _value_case(-0.5) == pytest.approx((0.5 * 2.25, -1.5, False))


def _policy_case(ratio: float, advantage: float) -> tuple[float, float, bool, bool]:
    r = torch.tensor([[ratio]], requires_grad=True)
    loss, low, high = clipped_policy_loss(r, torch.tensor([[advantage]]), clip_low=0.2, clip_high=0.2)
    loss.sum().backward()
    return loss.item(), r.grad.item(), bool(low.item()), bool(high.item())


def test_policy_loss_with_token_advantages_on_both_sides_of_the_clip():
    # A > 0: above 1 + eps the gain is capped (no gradient); below 1 - eps it is not (the ratio may recover).
    assert _policy_case(1.5, 2.0) == pytest.approx((-2.4, 0.0, False, True))
    assert _policy_case(1.1, 2.0) == pytest.approx((-2.2, -2.0, False, False))
    assert _policy_case(0.5, 2.0) == pytest.approx((-1.0, -2.0, False, False))
    # A < 0: below 1 - eps the gain is capped; above 1 + eps the loss keeps growing with the ratio.
    assert _policy_case(0.5, -1.0) == pytest.approx((0.8, 0.0, True, False))
    assert _policy_case(1.5, -1.0) == pytest.approx((1.5, 1.0, False, False))


def test_kl_controllers():
    fixed = KLController(0.1)
    assert fixed.update(5.0, 64) == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=1000)
    up = adaptive.update(9.0, 100)  # KL above target: the penalty grows; the error is clipped at +0.2
    assert up == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    down = adaptive.update(5.4, 100)  # below target: it shrinks, in proportion (-0.1)
    assert down == pytest.approx(up * (1 - 0.1 * 100 / 1000)) and down < up
    assert adaptive.update(6.0, 100) == pytest.approx(down)  # on target: unchanged


def _tiny_rollouts(score_head: bool):
    from llmhpc.config.schema import ModelConfig
    from llmhpc.models import build_model
    from llmhpc.train.losses import IGNORE_INDEX

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=64, score_head=score_head))
    input_ids = torch.randint(0, 97, (3, 12))
    labels = torch.full((3, 12), IGNORE_INDEX)
    for row, (start, end) in enumerate([(4, 11), (6, 9), (3, 12)]):  # answer tokens predicted at start..end-1
        labels[row, start - 1:end - 1] = input_ids[row, start:end]
    return model, input_ids, labels, labels != IGNORE_INDEX


def test_value_objective_against_the_formula():
    from llmhpc.rl.ppo import ValueObjective

    model, input_ids, labels, mask = _tiny_rollouts(score_head=True)
    old_values, returns = torch.randn(3, 12) * mask, torch.randn(3, 12) * mask
    out = ValueObjective(clip=0.1)(model, {"input_ids": input_ids, "labels": labels, "old_values": old_values,
                                           "returns": returns})
    assert out.count == int(mask.sum())
    with torch.no_grad():
        values = model.score(model(input_ids, return_hidden=True)).squeeze(-1)
    clipped = old_values + (values - old_values).clamp(-0.1, 0.1)
    want = (0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2))[mask].sum()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0


def test_actor_objective_takes_one_advantage_per_token():
    from llmhpc.rl.grpo import GRPOObjective

    model, input_ids, labels, mask = _tiny_rollouts(score_head=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    old = (logp + 0.3 * torch.randn(3, 12)) * mask  # ratios on both sides of the clip
    advantages = torch.randn(3, 12) * mask
    out = GRPOObjective(loss_norm="token")(model, {"input_ids": input_ids, "labels": labels, "old_logprobs": old,
                                                   "advantages": advantages})
    ratio = (logp - old).exp()
    want = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)[mask].sum()
    assert out.count == int(mask.sum()) and out.loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_the_reward_model_score_enters_the_reward_weighted_and_is_logged_as_scored():
    from llmhpc.rl.rewards import RewardSet
    from llmhpc.stages.ppo import PPORewards

    def scorer(prompts, completions):
        return [10.0 * len(c) for c in completions]  # a reward model's scores, as RewardScorer returns them

    rewards = PPORewards(RewardSet.from_specs({"correct": 2.0}), scorer, weight=0.25)
    total, columns = rewards.score(["The answer is 4.", "5"], [{"prompt": "2+2?", "answer": "4"}] * 2)
    assert rewards.functions == ["correct", "reward_model"]
    assert columns.tolist() == [[1.0, 160.0], [0.0, 10.0]]          # unweighted, per function
    assert total.tolist() == [2.0 * 1 + 0.25 * 160, 0.25 * 10]      # weighted sum
