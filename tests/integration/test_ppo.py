"""`llmhpc ppo` end to end on the tiny model (trained 2 steps under tp=2 x pp=2, SmolLM2's tokenizer): actor and critic
are the two components of every checkpoint and a run stopped between two updates of a rollout resumes bit for bit,
both of them (also after a critic warm-up); the KL to the starting model starts at 0 and grows; a reward model
scores the answers and starts the critic, and stored in bf16 (with the reference) gives its numbers within bf16's
rounding.

Rewards are named by dotted path (`tests.grpo_rewards`): a random model never answers arithmetic right.
"""

from __future__ import annotations

import pytest
import torch

from llmhpc.checkpoint import latest_checkpoint, read_meta
from llmhpc.checkpoint.manager import stored_shapes, stored_tensor_reader
from llmhpc.metrics.jsonl import read_metrics
from llmhpc.models import load_pretrained
from llmhpc.rl.ppo import answer_ends
from llmhpc.rl.reward_model import RewardScorer
from tests.conftest import one_line_error, run_cli
from tests.distributed.launch import copy_run_stopped_at, run_torchrun, step_losses

PPO = ["max_new_tokens=8", "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.seq_len=128",
       "trainer.eval_every=0", "trainer.lr=1e-2", "critic_lr=1e-3", "logger.progress_bar=false", "run.device=cpu"]


def _critic(run_dir) -> dict[str, torch.Tensor]:
    step_dir = latest_checkpoint(run_dir / "checkpoints")
    return stored_tensor_reader(step_dir, "critic")(stored_shapes(step_dir, "critic"))


def _common(policy) -> list[str]:
    return ["ppo", f"model.init_from={policy}", *PPO, "reward=[tests.grpo_rewards.odd_length]", "updates_per_rollout=2",
            "samples_per_prompt=4", "trainer.max_steps=4", "trainer.ckpt_every=1", "kl_target=0.01"]


@pytest.fixture(scope="module")
def ppo_run(tp2_pp2_checkpoint, llmhpc_cache, tmp_path_factory):
    """4 steps (2 rollouts x 2 updates of 2 prompts x 4 answers, each prompt's answers in one row) on one process,
    a checkpoint after each."""
    run = tmp_path_factory.mktemp("ppo") / "run"
    run_cli([*_common(tp2_pp2_checkpoint), f"run.dir={run}"], llmhpc_cache)
    return run


def test_ppo_checkpoints_actor_and_critic_and_resumes_bitwise(ppo_run, tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    common, run, resumed = _common(tp2_pp2_checkpoint), ppo_run, tmp_path / "resumed"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["rollout"] for r in records] == [1, 1, 2, 2]
    for name in ("reward", "reward_odd_length", "kl", "kl_coef", "value_loss", "value_clipped", "value_error",
                 "value_mean", "value_explained_variance", "entropy", "clip_low", "clip_high", "completion_length",
                 "rollout_tokens_per_s"):
        assert name in records[0], name
    assert all(r["value_explained_variance"] < 1 for r in records)  # a new value head does not predict returns
    # The first rollout samples from the reference itself: no KL. Its first update has ratio 1 on whitened
    # advantages (mean 0): loss 0. The second rollout comes from moved weights.
    assert abs(records[0]["kl"]) < 1e-4 < records[2]["kl"]
    assert abs(records[0]["loss"]) < 1e-5 and records[1]["loss"] != 0
    # Adaptive KL: the first rollout's KL (0) was under the target, so the coefficient shrank for the second.
    assert records[2]["kl_coef"] < records[0]["kl_coef"] == 0.05
    meta = read_meta(latest_checkpoint(run / "checkpoints"))
    assert list(meta["components"]) == ["model", "critic"]
    critic = _critic(run)
    assert "score.weight" in critic

    copy_run_stopped_at(run, resumed, 3)  # stopped between rollout 2's two updates, then started again
    proc = run_cli([*common, f"run.dir={resumed}"], llmhpc_cache)
    assert "resumed from" in proc.stdout
    assert step_losses(resumed) == step_losses(run)
    assert [r["value_loss"] for r in read_metrics(resumed / "metrics.jsonl")] == [r["value_loss"] for r in records]
    ours, _ = load_pretrained(run)
    again, _ = load_pretrained(resumed)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values(), strict=True))
    assert all(torch.equal(critic[name], value) for name, value in _critic(resumed).items())
    start, _ = load_pretrained(tp2_pp2_checkpoint)  # the actor trained
    assert not torch.equal(start.layers["0"].attention.wq.weight, ours.layers["0"].attention.wq.weight)


def test_critic_warmup_trains_the_critic_alone_first_and_resumes(ppo_run, tp2_pp2_checkpoint, llmhpc_cache,
                                                                tmp_path):
    """critic_warmup=1: the stream's first rollout batch trains the critic only; the actor's first rollout is the
    second batch, still sampled from the starting weights (KL 0, first loss 0), the KL coefficient has not moved,
    and a run stopped after the warm-up and one update resumes bit for bit without warming up again."""
    common = [*_common(tp2_pp2_checkpoint), "critic_warmup=1"]
    run, resumed = tmp_path / "warm", tmp_path / "resumed"
    run_cli([*common, f"run.dir={run}"], llmhpc_cache)
    records, plain = read_metrics(run / "metrics.jsonl"), read_metrics(ppo_run / "metrics.jsonl")
    assert [r["rollout"] for r in records] == [1, 1, 2, 2]
    assert abs(records[0]["kl"]) < 1e-4 and abs(records[0]["loss"]) < 1e-5
    assert records[0]["kl_coef"] == 0.05 > records[2]["kl_coef"]  # the warm-up left the adaptive coefficient alone
    # other prompts than the plain run's first rollout (the warm-up took those), so other rewards and values
    assert records[0]["value_mean"] != plain[0]["value_mean"]
    state = read_meta(latest_checkpoint(run / "checkpoints"))["ranks"][0]["data"]
    plain_state = read_meta(latest_checkpoint(ppo_run / "checkpoints"))["ranks"][0]["data"]
    assert state["critic_warmed"] == 1 and state["cursor"] == plain_state["cursor"] * 3 // 2

    copy_run_stopped_at(run, resumed, 2)
    run_cli([*common, f"run.dir={resumed}"], llmhpc_cache)
    assert step_losses(resumed) == step_losses(run)
    assert [r["value_loss"] for r in read_metrics(resumed / "metrics.jsonl")] == [r["value_loss"] for r in records]
    assert all(torch.equal(_critic(run)[name], value) for name, value in _critic(resumed).items())


def _stored_batches(run_dir) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of the rollout batch stored with a run's newest checkpoint."""
    return [{k: torch.tensor(v["data"]) for k, v in batch.items()}
            for batch in read_meta(latest_checkpoint(run_dir / "checkpoints"))["ranks"][0]["data"]["batches"]]


def _rollout_rows(run_dir) -> list[tuple[tuple[int, ...], float, torch.Tensor]]:
    """(the tokens before the row's first answer, return at the answer's first token, returns of its answer tokens)
    of every answer of the rollout batch stored with a run's newest checkpoint (a row per answer, or a prompt's
    answers back to back in one row)."""
    rows = []
    for batch in _stored_batches(run_dir):
        mask = batch["labels"] != -100
        ends = answer_ends(mask, batch.get("position_ids"))
        for row in range(mask.shape[0]):
            tokens = mask[row].nonzero().flatten().tolist()
            prompt, start = tuple(batch["input_ids"][row, :tokens[0]].tolist()), tokens[0]
            for t in tokens:
                if ends[row, t]:
                    rows.append((prompt, float(batch["returns"][row, start]), batch["returns"][row, start:t + 1]))
                    start = t + 1
    return rows


def test_group_baseline_centres_each_prompts_scores(tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    """group_baseline=true: each answer's score is its reward minus the mean reward of its prompt's answers. With
    no KL penalty and lam = gamma = 1 the return of every answer token is that score, so the returns of a
    prompt's answers sum to 0 and differ by the 0 / 1 rewards' differences; without it they are the rewards."""
    args = ["ppo", f"model.init_from={tp2_pp2_checkpoint}", *PPO, "reward=[tests.grpo_rewards.odd_length]",
            "samples_per_prompt=4", "kl_coef=0", "lam=1.0", "trainer.max_steps=1", "trainer.ckpt_every=1"]
    for centred in (True, False):
        run = tmp_path / f"centred_{centred}"
        run_cli([*args, f"group_baseline={str(centred).lower()}", f"run.dir={run}"], llmhpc_cache)
        rows = _rollout_rows(run)
        assert len(rows) == 8
        for _, score, returns in rows:
            assert torch.allclose(returns, torch.full_like(returns, score), atol=1e-6)  # one return per answer
        groups: dict[tuple[int, ...], list[float]] = {}
        for prompt, score, _ in rows:
            groups.setdefault(prompt, []).append(score)
        assert sorted(len(g) for g in groups.values()) == [4, 4]
        for scores in groups.values():
            if centred:
                assert sum(scores) == pytest.approx(0, abs=1e-6)
                assert all(min(abs(abs(a - b) - d) for d in (0, 1)) < 1e-5 for a in scores for b in scores)
            else:
                assert all(min(abs(score - r) for r in (0, 1)) < 1e-5 for score in scores)
        if centred:
            assert any(abs(score) > 0.2 for _, score, _ in rows)  # a prompt whose answers' lengths differ in parity


def test_shared_prompt_rows_give_the_numbers_of_a_row_per_answer(ppo_run, tp2_pp2_checkpoint, llmhpc_cache,
                                                                 tmp_path):
    """shared_prompt=true (the default; ppo_run): the reference's log-probs, the critic's values, the rewards and GAE
    per answer, the value loss and the actor's loss of a row per answer (shared_prompt=false), over 2 rollouts of
    2 updates, from fewer input tokens."""
    run = tmp_path / "plain"
    run_cli([*_common(tp2_pp2_checkpoint), "shared_prompt=false", f"run.dir={run}"], llmhpc_cache)
    plain, shared = read_metrics(run / "metrics.jsonl"), read_metrics(ppo_run / "metrics.jsonl")
    for name in ("loss", "value_loss", "value_error", "kl", "kl_coef", "reward", "value_mean", "entropy"):
        assert [r[name] for r in shared] == pytest.approx([r[name] for r in plain], rel=1e-4, abs=1e-5), name
    assert shared[2]["kl"] > 1e-4 and shared[1]["loss"] != 0  # the comparison covers a moved policy
    rows = {n: sorted((p, round(first, 4)) for p, first, _ in _rollout_rows(d)) for n, d in (("plain", run),
                                                                                            ("shared", ppo_run))}
    assert len(rows["shared"]) == 8 and [r[1] for r in rows["shared"]] == pytest.approx([r[1] for r in rows["plain"]],
                                                                                          abs=2e-4)
    tokens = {n: sum(b["input_ids"].numel() for b in _stored_batches(d)) for n, d in (("plain", run),
                                                                                    ("shared", ppo_run))}
    assert tokens["shared"] < tokens["plain"], tokens


def test_ppo_under_fsdp2_gives_the_numbers_of_one_process(ppo_run, tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    """dp_shard=2: each rank samples its own prompts (the same answers as one process: sampling is seeded per
    prompt), the advantages are whitened over both ranks' tokens, and the adaptive KL moves on both alike."""
    run = tmp_path / "dp2"
    run_torchrun(2, [*_common(tp2_pp2_checkpoint), "parallel.dp_shard=2", f"run.dir={run}"], llmhpc_cache)
    ours, one = read_metrics(run / "metrics.jsonl"), read_metrics(ppo_run / "metrics.jsonl")
    for name in ("loss", "value_loss", "kl", "kl_coef", "reward", "value_mean", "value_explained_variance"):
        assert [r[name] for r in ours] == pytest.approx([r[name] for r in one], rel=1e-4, abs=1e-5), name


def test_reward_model_scores_answers_and_starts_the_critic(tp2_pp2_checkpoint, pairs_file, llmhpc_cache, tmp_path):
    rm = tmp_path / "rm"  # one step at a large learning rate: every weight moves ~1e-2 from where it started
    run_cli(["reward", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={pairs_file}", "trainer.max_steps=1",
             "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.seq_len=160", "trainer.lr=1e-2",
             "trainer.warmup_steps=0", "trainer.eval_every=0", "logger.progress_bar=false", "run.device=cpu",
             f"run.dir={rm}"], llmhpc_cache)
    run = tmp_path / "ppo"
    run_cli(["ppo", f"model.init_from={tp2_pp2_checkpoint}", *PPO, f"reward_model_path={rm}", "reward=[]",
             "critic_lr=1e-5", "updates_per_rollout=1", "trainer.max_steps=1", f"run.dir={run}"], llmhpc_cache)
    (record,) = read_metrics(run / "metrics.jsonl")
    # The reward is the reward model's score alone.
    assert record["reward"] == pytest.approx(record["reward_reward_model"], rel=1e-6)
    assert record["reward"] != 0
    # The critic started as the reward model (head and backbone, not the policy with a new head) and took one
    # Adam step of 1e-5 from it: within ~1e-5 of every RM weight, where the policy's are ~1e-2 away.
    scorer = RewardScorer.load(rm)
    critic, rm_weights = _critic(run), scorer.model.state_dict()
    for name in ("score.weight", "layers.0.attention.wq.weight"):
        assert 0 < (critic[name] - rm_weights[name]).abs().max().item() < 1e-4, name
    policy, _ = load_pretrained(tp2_pp2_checkpoint)
    assert (critic["layers.0.attention.wq.weight"] - policy.layers["0"].attention.wq.weight).abs().max() > 1e-3

    # The reference and the reward model stored in bf16 (offloading is a no-op on the host): the same answers
    # (sampled by the fp32 actor), scored within bf16's rounding, and a first-rollout KL that is rounding only.
    half = tmp_path / "ppo-bf16"
    run_cli(["ppo", f"model.init_from={tp2_pp2_checkpoint}", *PPO, f"reward_model_path={rm}", "reward=[]",
             "critic_lr=1e-5", "updates_per_rollout=1", "trainer.max_steps=1", "frozen_dtype=bf16",
             "offload_frozen=true", f"run.dir={half}"], llmhpc_cache)
    (bf16,) = read_metrics(half / "metrics.jsonl")
    assert bf16["completion_length"] == record["completion_length"]
    assert bf16["reward"] == pytest.approx(record["reward"], rel=0.05) and bf16["reward"] != record["reward"]
    assert abs(record["kl"]) < 1e-5 < abs(bf16["kl"]) < 0.05, (record["kl"], bf16["kl"])


def test_ppo_errors_are_one_line(capsys, tp2_pp2_checkpoint, tmp_path):
    base = ["ppo", f"model.init_from={tp2_pp2_checkpoint}", *PPO, f"run.dir={tmp_path / 'x'}"]
    one_line_error(capsys, [*base, "reward=[]"], "ppo has no reward", "reward_model_path")
    one_line_error(capsys, [*base, "samples_per_prompt=3"], "trainer.global_batch_size=8",
                   "ppo.samples_per_prompt=3")
    one_line_error(capsys, [*base, "kl_coef=-1"], "ppo.kl_coef must be >= 0")
    one_line_error(capsys, [*base, "frozen_dtype=fp16"], "ppo.frozen_dtype='fp16' is not one of: fp32, bf16")
    one_line_error(capsys, [*base, "group_baseline=true"], "ppo.group_baseline=true needs ppo.samples_per_prompt > 1")
    one_line_error(capsys, [*base, "critic_warmup=-1"], "ppo.critic_warmup must be >= 0")
