"""`llmhpc reward` end to end on the tiny model (trained 2 steps under tp=2 x pp=2, SmolLM2's tokenizer): the
run logs the pairwise metrics and resumes bit for bit, its checkpoint scores answers through `RewardScorer`
exactly as the held-out eval did, LoRA trains the head with the adapters, and bad options stop in one line."""

from __future__ import annotations

import json

import pytest
import torch

from llmhpc.config.schema import RunConfig
from llmhpc.data.preference import load_preference_pairs
from llmhpc.data.sft import split_examples
from llmhpc.data.tokenizer import load_tokenizer
from llmhpc.metrics.jsonl import read_metrics
from llmhpc.models import load_pretrained
from llmhpc.models.llama import init_score_head
from llmhpc.models.loader import tokenizer_spec
from llmhpc.rl.reward_model import RewardScorer
from llmhpc.rl.rollout import RolloutEngine
from llmhpc.rl.sampling import SamplingParams
from llmhpc.scoring.answers import prompt_ids, question_from_row
from tests.conftest import one_line_error, run_cli
from tests.distributed.launch import copy_run_stopped_at, step_losses

REWARD = ["trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.seq_len=160", "trainer.lr=1e-3",
          "trainer.warmup_steps=0", "logger.progress_bar=false", "run.device=cpu"]


def _held_out_rows(model_path, pairs_file) -> list[dict]:
    """The rows of the pairs a run with data.val_fraction=0.25 and the default seed holds out."""
    tokenizer = load_tokenizer(tokenizer_spec(model_path))
    pairs, _ = load_preference_pairs(pairs_file, tokenizer, 160)
    _, held = split_examples(pairs, 0.25, seed=RunConfig().seed)
    rows = {p.digest: row for p, row in zip(pairs, map(json.loads, pairs_file.read_text().splitlines()), strict=True)}
    return [rows[p.digest] for p in held]


def test_reward_trains_resumes_bitwise_and_scores(tp2_pp2_checkpoint, pairs_file, llmhpc_cache, tmp_path, capsys):
    common = ["reward", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={pairs_file}", *REWARD,
              "data.val_fraction=0.25", "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.eval_every=4"]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    run_cli([*common, f"run.dir={run}"], llmhpc_cache)
    records = read_metrics(run / "metrics.jsonl")
    for name in ("loss", "accuracy", "score_chosen", "score_rejected", "score_gap", "eval_loss", "eval_accuracy"):
        assert name in records[3], name
    assert records[0]["loss"] == pytest.approx(0.6931, abs=0.05)  # a fresh head of std 0.02 scores near 0

    copy_run_stopped_at(run, resumed, 2)
    proc = run_cli([*common, f"run.dir={resumed}"], llmhpc_cache)
    assert "resumed from" in proc.stdout
    assert step_losses(resumed) == step_losses(run)
    ours, _ = load_pretrained(run)
    again, _ = load_pretrained(resumed)
    assert ours.score is not None
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values(), strict=True))
    start, _ = load_pretrained(tp2_pp2_checkpoint)  # the backbone trained too
    assert not torch.equal(start.layers["0"].attention.wq.weight, ours.layers["0"].attention.wq.weight)

    # The scorer reads the run and scores (prompt, answer) as training did: its mean gap over the pairs the run
    # held out (data.val_fraction of them, split by run.seed) is the logged eval gap.
    picked = _held_out_rows(tp2_pp2_checkpoint, pairs_file)
    scorer = RewardScorer.load(run)
    assert scorer.pooling == "last"
    assert scorer.pairwise(picked)["gap"] == pytest.approx(records[3]["eval_score_gap"], rel=1e-4, abs=1e-5)

    # `llmhpc eval task=preferences` scores the held-out arithmetic pairs with the same scorer.
    out = tmp_path / "eval.json"
    run_cli(["eval", f"model.init_from={run}", "task=preferences", "problems=6", f"output={out}"], llmhpc_cache)
    from llmhpc.data.arithmetic import held_out_problems
    from llmhpc.data.arithmetic_preferences import preference_rows

    seed = RunConfig().seed
    want = scorer.pairwise(preference_rows(held_out_problems(6, seed), seed + 1))
    got = json.loads(out.read_text())[str(run)]["preferences"]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5) and 0 <= got["accuracy"] <= 1

    # Best-of-n with the run as the judge: n samples per question, the best scored graded.
    run_cli(["eval", f"model.init_from={tp2_pp2_checkpoint}", "task=arithmetic", "problems=2", "best_of=2",
             f"judge={run}", "max_new_tokens=8", f"output={out}"], llmhpc_cache)
    best = json.loads(out.read_text())[str(tp2_pp2_checkpoint)]["arithmetic"]
    assert set(best) == {"accuracy", "sample_accuracy", "any_right", "questions"} and best["questions"] == 2
    assert best["accuracy"] <= best["any_right"] and best["sample_accuracy"] <= best["any_right"]
    # Greedy with a judge: the reward model's mean score of the greedy replies, as the scorer gives it for them.
    run_cli(["eval", f"model.init_from={tp2_pp2_checkpoint}", "task=arithmetic", "problems=2", f"judge={run}",
             "max_new_tokens=8", f"output={out}"], llmhpc_cache)
    greedy = json.loads(out.read_text())[str(tp2_pp2_checkpoint)]["arithmetic"]
    asked = [question_from_row(p.to_row()) for p in held_out_problems(2, seed)]
    policy, tokenizer = load_pretrained(tp2_pp2_checkpoint)
    engine = RolloutEngine(policy, batch_size=2, eos_token_ids=[tokenizer.eos_token_id])
    finished = engine.generate([prompt_ids(tokenizer, q) for q in asked], SamplingParams(max_new_tokens=8,
                                                                                          temperature=0))
    replies = [tokenizer.decode(r.tokens[:-1] if r.finish_reason == "stop" else r.tokens, skip_special_tokens=True)
               for r in finished]
    chats = [[{"role": "user", "content": q.chat[0][1]}] for q in asked]
    assert greedy["judge_score"] == pytest.approx(sum(scorer(chats, replies)) / 2, rel=1e-4, abs=1e-5)
    # The export formats hold language models: a reward model is refused in one line, nothing written.
    one_line_error(capsys, ["convert", f"src={run}", f"dst={tmp_path / 'export'}"], "a reward model")
    assert not (tmp_path / "export").exists()


def test_lora_reward_trains_head_and_adapters(tp2_pp2_checkpoint, pairs_file, llmhpc_cache, tmp_path):
    run = tmp_path / "run"
    run_cli(["reward", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={pairs_file}", *REWARD, "peft=lora",
             "peft.rank=4", "peft.dropout=0", "trainer.max_steps=2", "trainer.eval_every=0", f"run.dir={run}"],
            llmhpc_cache)
    trained, _ = load_pretrained(run)  # adapters folded in
    start, _ = load_pretrained(tp2_pp2_checkpoint)
    assert not torch.equal(start.layers["0"].attention.wq.weight, trained.layers["0"].attention.wq.weight)
    assert torch.equal(start.tok_embeddings.weight, trained.tok_embeddings.weight)  # frozen base
    drawn = load_pretrained(run)[0]
    init_score_head(drawn, seed=RunConfig().seed)  # where the head started: drawn from run.seed
    assert not torch.equal(trained.score.weight, drawn.score.weight)


def test_reward_errors_are_one_line(capsys, tp2_pp2_checkpoint):
    one_line_error(capsys, ["reward", "center_coefficient=-1", f"model.init_from={tp2_pp2_checkpoint}"],
                   "reward_model.center_coefficient")
    one_line_error(capsys, ["reward", "model.score_head=false", f"model.init_from={tp2_pp2_checkpoint}",
                            "run.device=cpu"], "model.score_head=true")
    one_line_error(capsys, ["eval", "best_of=4", f"model.init_from={tp2_pp2_checkpoint}"], "best_of=4",
                   "judge=")
    one_line_error(capsys, ["reward", f"model.init_from={tp2_pp2_checkpoint}", "sampled_from=/no/such/policy"],
                   "/no/such/policy", "sampled_from")
    one_line_error(capsys, ["reward", f"model.init_from={tp2_pp2_checkpoint}", f"sampled_from={tp2_pp2_checkpoint}",
                            "data.source=pairs.jsonl"], "data.source=arithmetic")
    one_line_error(capsys, ["reward", "samples_per_problem=1", f"model.init_from={tp2_pp2_checkpoint}"],
                   "reward_model.samples_per_problem must be >= 2")


def test_a_summed_head_run_is_scored_summed(tp2_pp2_checkpoint, pairs_file, llmhpc_cache, tmp_path):
    """`pooling=sum` trains a head summed over each answer; its run keeps that, so the scorer loaded from it sums
    too and gives the held-out gap the run logged (a last-token read would not)."""
    run = tmp_path / "run"
    run_cli(["reward", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={pairs_file}", *REWARD, "pooling=sum",
             "data.val_fraction=0.25", "trainer.max_steps=2", "trainer.eval_every=2", f"run.dir={run}"], llmhpc_cache)
    logged = read_metrics(run / "metrics.jsonl")[1]["eval_score_gap"]
    scorer = RewardScorer.load(run)
    assert scorer.pooling == "sum"
    picked = _held_out_rows(tp2_pp2_checkpoint, pairs_file)
    assert scorer.pairwise(picked)["gap"] == pytest.approx(logged, rel=1e-4, abs=1e-5)
    scorer.pooling = "last"
    assert scorer.pairwise(picked)["gap"] != pytest.approx(logged, rel=1e-2)


def test_sampled_from_adds_the_policys_own_answers_ranked(tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    """sampled_from=<policy>: the policy's own samples to the training problems after the shipped pairs' ones,
    ranked by their final number, are sampled once into the cache and trained on beside the shipped pairs."""
    from llmhpc.data.arithmetic import training_problems
    from llmhpc.data.arithmetic_preferences import sampled_pair_rows
    from llmhpc.scoring.answers import is_right, sampled_replies

    longer = [a for a in REWARD if not a.startswith("trainer.seq_len=")] + ["trainer.seq_len=320"]  # 128 new tokens
    args = ["reward", f"model.init_from={tp2_pp2_checkpoint}", *longer, "arithmetic_pairs=4", "eval_pairs=2",
            f"sampled_from={tp2_pp2_checkpoint}", "sampled_problems=3", "samples_per_problem=2",
            "trainer.max_steps=1", "trainer.eval_every=0"]
    first = run_cli([*args, f"run.dir={tmp_path / 'a'}"], llmhpc_cache)
    assert "sampling 2 answers to each of 3 training problems" in first.stderr
    written = sorted((llmhpc_cache / "arithmetic").glob("sampled_pairs_*_after4_n3x2_t1.jsonl"))
    assert len(written) == 1
    rows = [json.loads(line) for line in written[0].read_text().splitlines()]

    problems = training_problems(7, RunConfig().seed)[4:]  # after the 4 problems of the shipped pairs
    questions = [question_from_row(p.to_row()) for p in problems]
    policy, tokenizer = load_pretrained(tp2_pp2_checkpoint)
    samples = sampled_replies(policy, tokenizer, questions, n=2, temperature=1.0, batch_size=5,
                              seed=RunConfig().seed)
    assert len({text for answers in samples for text in answers}) > 3  # sampled, not greedy
    by_question = {p.question: q for p, q in zip(problems, questions, strict=True)}
    assert rows == sampled_pair_rows(problems, samples, lambda p, text: is_right(by_question[p.question], text))
    assert len(rows) >= 3  # a tiny model's answers are wrong: the worked solution over each distinct one
    assert "preference data: " in first.stdout and first.stdout.count("preference data: ") == 2

    again = run_cli([*args, f"run.dir={tmp_path / 'b'}"], llmhpc_cache)  # the cached pairs, not sampled again
    assert "sampling" not in again.stderr
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")
