"""Reward models (`llmhpc.rl.reward_model`): the Bradley-Terry loss against numbers worked out by hand, the
objective's loss and gradients on a tiny model against a gradient derived by hand, last-token scoring unchanged
by batching and padding, the score head's draw and loading, and the pair reader's margins."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.data.arithmetic import train_eval_split
from llmhpc.data.arithmetic_preferences import preference_rows
from llmhpc.data.preference import load_preference_pairs, pair_batch
from llmhpc.data.tokenizer import load_tokenizer
from llmhpc.errors import InputError
from llmhpc.models import build_model
from llmhpc.models.llama import SCORE_HEAD, init_score_head
from llmhpc.rl.reward_model import RewardObjective, bradley_terry_losses


def _neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.2, 0.5, 2.0])
    # gaps 0.8, -1.0, 0: -log sigmoid = 0.371101, 1.313262, log 2.
    want = [_neg_log_sigmoid(0.8), _neg_log_sigmoid(-1.0), math.log(2)]
    assert bradley_terry_losses(chosen, rejected).tolist() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx([0.371101, 1.313262, 0.693147], abs=1e-6)
    # A margin m asks for a gap of at least m: the loss is that of gap - m.
    margin = torch.tensor([0.3, 0.0, -1.0])
    got = bradley_terry_losses(chosen, rejected, margin)
    assert got.tolist() == pytest.approx([_neg_log_sigmoid(0.5), _neg_log_sigmoid(-1.0), _neg_log_sigmoid(1.0)],
                                         abs=1e-6)
    # Centering adds c (r_c + r_r)^2: 0.01 * 1.44, 0, 0.01 * 16.
    centered = bradley_terry_losses(chosen, rejected, None, 0.01)
    assert (centered - bradley_terry_losses(chosen, rejected)).tolist() == pytest.approx([0.0144, 0.0, 0.16],
                                                                                         abs=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def pairs(tokenizer, tmp_path_factory):
    rows = preference_rows(train_eval_split(6, 0, seed=4)[0], seed=4)
    for i, row in enumerate(rows):
        row["margin"] = 0.25 * i
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    found, _ = load_preference_pairs(path, tokenizer, 256)
    assert [p.margin for p in found] == [0.25 * i for i in range(6)]
    return found


def _tiny(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                   max_seq_len=256, score_head=True))


def test_objective_loss_and_gradients_match_a_derivation_by_hand(pairs, tokenizer):
    """Each side alone (no batch, no padding): r = w . h_last. With g = r_c - r_r - m, the loss sum over pairs is
    sum softplus(-g) + c (r_c + r_r)^2, so dL/dw = sum -sigmoid(-g) (h_c - h_r) + 2 c (r_c + r_r) (h_c + h_r)."""
    model, c = _tiny(len(tokenizer)), 0.05
    chunk = pairs[1:5]
    out = RewardObjective(center_coefficient=c)(model, pair_batch(chunk, pad_id=0, layout="whole"))
    assert out.count == 4
    out.loss.backward()
    grad_w = model.score.weight.grad.clone()[0]

    w = model.score.weight.detach()[0]
    with torch.no_grad():
        last = {id(side): model(torch.from_numpy(side.tokens)[None], return_hidden=True)[0, -1]
                for pair in chunk for side in (pair.chosen, pair.rejected)}
    want_loss, want_grad, accurate = 0.0, torch.zeros_like(w), 0
    for pair in chunk:
        h_c, h_r = last[id(pair.chosen)], last[id(pair.rejected)]
        r_c, r_r = float(w @ h_c), float(w @ h_r)
        g = r_c - r_r - pair.margin
        want_loss += _neg_log_sigmoid(g) + c * (r_c + r_r) ** 2
        want_grad += -(1 - 1 / (1 + math.exp(-g))) * (h_c - h_r) + 2 * c * (r_c + r_r) * (h_c + h_r)
        accurate += r_c > r_r
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-5)
    assert torch.allclose(grad_w, want_grad, rtol=1e-4, atol=1e-6)
    assert out.metrics["accuracy"][0].item() == accurate
    # The backbone trains too: its gradient is that of the same loss through the hidden states.
    assert model.layers["0"].attention.wq.weight.grad.abs().sum() > 0


def _alone(model, side, pooling: str) -> torch.Tensor:
    """A side's score from its own unpadded row: w . h at its last token, or summed over its answer tokens."""
    values = model.score_values(model(torch.from_numpy(side.tokens)[None], return_hidden=True))[0]
    return values[-1] if pooling == "last" else values[torch.from_numpy(side.answer)].sum()


@pytest.mark.parametrize("pooling", ["last", "sum"])
@pytest.mark.parametrize("layout", ["whole", "shared_prefix"])
def test_scores_do_not_depend_on_batching_padding_or_sharing(layout, pooling, pairs, tokenizer):
    from llmhpc.rl.reward_model import side_scores
    from llmhpc.train.objective import LMHead, model_inputs

    model = _tiny(len(tokenizer), seed=1)
    with torch.no_grad():
        batch = pair_batch(pairs, pad_id=0, layout=layout, width_multiple=64, pooling=pooling)
        assert batch["input_ids"].shape[1] % 64 == 0
        hidden = model(**model_inputs(batch), return_hidden=True)
        together = side_scores(LMHead(model), hidden, batch)
        alone = [_alone(model, s, pooling) for s in [p.chosen for p in pairs] + [p.rejected for p in pairs]]
    assert torch.allclose(together, torch.stack(alone), atol=1e-4)
    if pooling == "sum":  # every answer token of every side, once
        assert batch["answer_tokens"].shape[1] == sum(int(p.chosen.answer.sum() + p.rejected.answer.sum())
                                                      for p in pairs)
    assert batch["margin"].tolist() == [p.margin for p in pairs]
    if layout == "shared_prefix":  # one row per pair, shorter than the two sides by the prompt at least
        assert batch["input_ids"].shape[0] == len(pairs)
        real = sum(len(p.chosen.tokens) + len(p.rejected.tokens) for p in pairs)
        assert int(batch["attention_mask"][:, 0].diagonal(dim1=1, dim2=2).sum()) < real


@pytest.mark.parametrize("pooling", ["last", "sum"])
def test_the_scorer_scores_as_training_does(pooling, pairs, tokenizer):
    """RewardScorer renders prompt / answer text itself and batches it its own way (right-padded rows, 3 at a
    time): each answer's score is still the one its side gets in a training batch."""
    from llmhpc.data.arithmetic_preferences import preference_rows
    from llmhpc.rl.reward_model import RewardScorer, side_scores
    from llmhpc.train.objective import LMHead, model_inputs

    model = _tiny(len(tokenizer), seed=3)
    rows = preference_rows(train_eval_split(6, 0, seed=4)[0], seed=4)
    scorer = RewardScorer(model, tokenizer, batch_size=3, pooling=pooling)
    with torch.no_grad():
        batch = pair_batch(pairs, pad_id=0, layout="whole", pooling=pooling)
        want = side_scores(LMHead(model), model(**model_inputs(batch), return_hidden=True), batch)
    got = scorer([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    assert got == pytest.approx(want.tolist(), abs=1e-4)
    gaps = want[:len(pairs)] - want[len(pairs):]
    assert scorer.pairwise(rows) == pytest.approx({"accuracy": float((gaps > 0).float().mean()),
                                                   "gap": float(gaps.mean())}, abs=1e-4)


@pytest.mark.parametrize("pooling", ["last", "sum"])
def test_shared_prefix_gives_the_gradients_of_separate_rows(pooling, pairs, tokenizer):
    grads = {}
    for layout in ("whole", "shared_prefix"):
        model = _tiny(len(tokenizer), seed=2)
        out = RewardObjective(center_coefficient=0.1)(model, pair_batch(pairs, pad_id=0, layout=layout,
                                                                         pooling=pooling))
        out.loss.backward()
        grads[layout] = (out.loss.item(), {n: p.grad for n, p in model.named_parameters()})
    (loss_a, a), (loss_b, b) = grads["whole"], grads["shared_prefix"]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def test_shared_prefix_length():
    import numpy as np

    from llmhpc.data.preference import shared_prefix_length

    a = np.array([1, 2, 3, 4, 5])
    assert shared_prefix_length(a, np.array([1, 2, 9, 4])) == 2
    assert shared_prefix_length(a, np.array([1, 2, 3])) == 2  # a side that is a prefix of the other keeps its last
    assert shared_prefix_length(a, a.copy()) == 4 and shared_prefix_length(a, np.array([7])) == 0


def test_score_head_draw_and_absence(tokenizer):
    model = _tiny(len(tokenizer))
    plain = build_model(ModelConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_dim=64, max_seq_len=256))
    assert SCORE_HEAD in dict(model.named_parameters()) and plain.score is None
    with pytest.raises(ValueError, match="score head"):
        plain.score_values(torch.zeros(1, 2, 32))
    # init_weights draws the head last: every other weight is that of the same model without a head.
    torch.manual_seed(7)
    model.init_weights()
    torch.manual_seed(7)
    plain.init_weights()
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in plain.state_dict().items())
    init_score_head(model, seed=3)
    first = model.score.weight.detach().clone()
    init_score_head(model, seed=3)
    assert torch.equal(first, model.score.weight) and first.std().item() == pytest.approx(0.02, rel=0.5)


def test_bad_margin_is_a_row_error(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(InputError, match=r"line 1.*margin"):
        load_preference_pairs(path, tokenizer, 64, on_error="fail")


def test_best_of_n_keeps_the_best_scored_reply():
    from llmhpc.scoring.answers import Question, grade_best_of_n

    questions = [Question((("user", "2 + 2?"),), "4"), Question((("user", "3 + 4?"),), "7"),
                 Question((("user", "9 - 1?"),), "8")]
    replies = ["It is 5.", "It is 4.", "The answer is 4.",    # question 1: right twice, the best scored is right
               "7", "It is 6.", "It is 1,007.",            # question 2: right once, the best scored is wrong
               "It is 3.", "no number", "It is 80."]       # question 3: never right
    scores = [0.1, 0.9, 0.5, 0.2, 0.8, 0.3, 0.0, 1.0, 0.0]
    got = grade_best_of_n(questions, replies, scores, n=3)
    assert got == {"accuracy": 1 / 3, "sample_accuracy": 3 / 9, "any_right": 2 / 3, "questions": 3.0}
    tie = grade_best_of_n(questions[:1], replies[:3], [0.5, 0.5, 0.5], n=3)
    assert tie["accuracy"] == 0.0  # a tie keeps the first of the best
    with pytest.raises(ValueError, match="need as many"):
        grade_best_of_n(questions, replies[:8], scores[:8], n=3)


@pytest.mark.parametrize("pooling", ["last", "sum"])
def test_the_scorer_scores_answers_that_do_not_tokenize_whole(pooling, tokenizer):
    """A sampled answer may start with spaces, whose first token would merge across the turn boundary: training
    skips such a row, but the scorer (PPO's reward, eval's judge) must score it, as the prompt's tokens followed
    by the answer's, the way a policy writes it after the generation prompt."""
    from llmhpc.data.chat import ChatRenderer, RenderError
    from llmhpc.rl.reward_model import RewardScorer

    question, answer = "What is 2 + 3?", "  5 apples"
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    with pytest.raises(RenderError, match="spans a turn boundary"):
        ChatRenderer(tokenizer, last_turn_only=True).render(chat)
    model = _tiny(len(tokenizer), seed=5)
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    head = tokenizer.encode(prompt, add_special_tokens=False)
    said = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    with torch.no_grad():
        values = model.score_values(model(torch.tensor([head + said]), return_hidden=True))[0]
    want = values[len(head):].sum() if pooling == "sum" else values[-1]
    got = RewardScorer(model, tokenizer, pooling=pooling)([question], [answer])
    assert got == pytest.approx([float(want)], abs=1e-5)
