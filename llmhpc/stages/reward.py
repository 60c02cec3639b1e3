"""Recipe: a reward model — the model with a scalar head, trained on ranked pairs with the Bradley-Terry loss.

    llmhpc reward model.init_from=<HF dir | .gguf | llmhpc run> [data.source=<.jsonl | .parquet | dir of pairs>]
                  [center_coefficient=0.01] [pooling=sum] [peft=lora] [sampled_from=<the policy to judge>]

Pairs (`prompt` / `chosen` / `rejected`, an optional `margin`; `llmhpc.data.preference`) are rendered with the
model's chat template and each side is scored at its last token (pooling=sum: summed over its answer);
data.source=arithmetic (the default) is the package's own set (`llmhpc.data.arithmetic_preferences`), its
held-out pairs from the held-out problems; sampled_from=<policy> adds pairs of that policy's own sampled
answers, a wrong one ranked below a right one (`llmhpc.stages.pairs.sampled_pairs_source`). The model gets a
scalar head (`model.score_head`, drawn from run.seed unless the source has one); the layout and optimizer come
from the shared builder, the loop is the shared trainer and the objective is
`llmhpc.rl.reward_model.RewardObjective`. Each eval logs the held-out loss and pairwise accuracy.

The checkpoint is a model with its head: `llmhpc.rl.reward_model.RewardScorer(run.dir)` scores answers with it
(PPO's reward, best-of-n), and `model.init_from=<this run>` starts a critic from it.

Layouts: one process, FSDP2 / DDP / HSDP (parallel.tp and parallel.pp must be 1, parallel.engine=torch).
"""

from __future__ import annotations

from llmhpc.config import Config, ConfigError
from llmhpc.data.preference import PairLoader, pair_eval_batches
from llmhpc.parallel import dp_rank, dp_size
from llmhpc.stages.pairs import load_pairs, require_data_parallel, sampled_pairs_source, sampling_policy
from llmhpc.stages.sft import fit_and_close, with_model_tokenizer
from llmhpc.train.builder import RunContext, build, distributed_run
from llmhpc.train.trainer import Trainer, TrainResult, report_done


def run(cfg: Config) -> TrainResult:
    """Train a reward model under the layout of cfg.parallel on WORLD_SIZE processes."""
    cfg = with_model_tokenizer(cfg)
    if not cfg.model.score_head:
        raise ConfigError("a reward model needs its scalar head: model.score_head=true (the reward default)")
    if cfg.reward_model.sampled_from:
        sampling_policy(cfg)  # a missing policy stops here, before any model is built
    with distributed_run(cfg) as where:
        require_data_parallel(cfg, where, "reward")
        return _train(cfg, where)


def _train(cfg: Config, where: RunContext) -> TrainResult:
    from llmhpc.data.tokenizer import load_tokenizer
    from llmhpc.rl.reward_model import RewardObjective

    built = build(cfg, where)
    cfg, t, r = built.cfg, built.cfg.trainer, built.cfg.reward_model
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampled = sampled_pairs_source(cfg) if r.sampled_from else None
    train, held, _ = load_pairs(cfg, tokenizer, r.arithmetic_pairs, r.eval_pairs, also_train=sampled)
    layout = "shared_prefix" if r.shared_prefix else "whole"
    loader = PairLoader(train, t.micro_batch_size, cfg.run.seed, pad_id=pad, dp_rank=dp_rank(where.mesh),
                        dp_size=dp_size(where.mesh), layout=layout, pooling=r.pooling)
    eval_batches = (pair_eval_batches(held, t.micro_batch_size, pad_id=pad, layout=layout, pooling=r.pooling)
                    if t.eval_every else [])
    objective = RewardObjective(center_coefficient=r.center_coefficient)
    head_flops = 6 * cfg.model.vocab_size * cfg.model.dim  # no logits: the scalar head replaces the LM head
    trainer = Trainer(cfg, built.engine, loader, objective, components=built.components, eval_batches=eval_batches,
                      flops_per_token=built.flops_per_token - head_flops, lineage=built.lineage,
                      lr_scales=built.lr_scales)
    return fit_and_close(trainer, cfg)


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc reward`: train, then (rank 0) report where the run ended."""
    return report_done(cfg, run(cfg))
