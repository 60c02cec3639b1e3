"""An objective that is not next-token cross entropy runs unchanged on every engine, with the same numbers.

`PairwiseLogSigmoid` scores pairs of rows (row 2i preferred over row 2i+1) by the difference of their summed
per-token log-probabilities (`LMHead.token_logprobs`: chunked, with gradient), as DPO-style losses do, and
logs its own metrics (pair accuracy and mean margin). The builder and Trainer run it for 4 AdamW steps on a
tiny tied-embedding model, in one process and, as real gloo processes in one torchrun launch, under
dp_shard=2, tp=2 (logits replicated, and vocabulary-sharded with loss parallel), pp=2 with every schedule
(the last stage scores; tied embeddings take the head-copy path) and DeepSpeed ZeRO-2. Every layout's
per-step loss, accuracy and margin must equal the one-process run's (fp32).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmhpc.metrics.jsonl import read_metrics
from llmhpc.train.losses import IGNORE_INDEX
from llmhpc.train.objective import LMHead, Metric, Objective

STEPS, GLOBAL_PAIRS, SEQ, PROMPT = 4, 4, 16, 6
TOL = 1e-5
"""fp32: layouts differ from one process only in summation order (measured below 1e-6 on the loss)."""
MODEL = ["model=tiny", "model.vocab_size=256", "model.dim=64", "model.n_layers=4", "model.n_heads=4",
         "model.n_kv_heads=2", "model.ffn_dim=128", "model.max_seq_len=64"]
COMMON = [*MODEL, f"trainer.max_steps={STEPS}", f"trainer.global_batch_size={2 * GLOBAL_PAIRS}",
          f"trainer.seq_len={SEQ}", "trainer.warmup_steps=0", "trainer.lr=3e-3", "trainer.eval_every=0",
          "trainer.ckpt_every=0", "logger.progress_bar=false", "run.device=cpu"]
PP = ["parallel.pp=2", "trainer.micro_batch_size=2"]
LAYOUTS = {
    # name: overrides on 2 processes; micro-batches hold whole pairs (an even number of rows)
    "dp_shard2": ["parallel.dp_shard=2", "trainer.micro_batch_size=2"],
    "tp2": ["parallel.tp=2", "trainer.micro_batch_size=4"],
    "tp2_loss_parallel": ["parallel.tp=2", "parallel.loss_parallel=true", "trainer.micro_batch_size=4"],
    "pp2_gpipe": [*PP, "parallel.pp_schedule=gpipe"],
    "pp2_1f1b": [*PP, "parallel.pp_schedule=1f1b"],
    "pp2_interleaved_1f1b": [*PP, "parallel.pp_schedule=interleaved_1f1b"],
    "pp2_zbv": [*PP, "parallel.pp_schedule=zbv"],
    "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2", "trainer.micro_batch_size=2"],
}
REPO = Path(__file__).resolve().parents[2]


class PairwiseLogSigmoid(Objective):
    """-log sigmoid(beta * (log p(row 2i) - log p(row 2i+1))) summed over pairs; normalized per pair."""

    name = "pairwise"
    beta = 0.5

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, head: LMHead, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                  dict[str, Metric]]:
        logp = head.token_logprobs(hidden, batch["labels"]).sum(-1)
        margin = logp[0::2] - logp[1::2]
        pairs = torch.tensor(float(margin.numel()))
        return -F.logsigmoid(self.beta * margin).sum(), {
            "accuracy": ((margin > 0).float().sum(), pairs),
            "margin": (margin.detach().sum(), pairs),
        }


class PairBatches:
    """Step k's global batch of pairs (seeded by k), this data-parallel rank's slice, in micro-batches.

    Both rows of a pair share the prompt; only the answer tokens after it are scored.
    """

    def __init__(self, micro: int, dp_rank: int, dp_size: int) -> None:
        self.micro, self.dp_rank, self.dp_size, self.step, self.queue = micro, dp_rank, dp_size, 0, []

    def _global(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 + self.step)
        ids = torch.randint(0, 256, (2 * GLOBAL_PAIRS, SEQ + 1), generator=gen)
        ids[1::2, :PROMPT] = ids[0::2, :PROMPT]
        labels = ids[:, 1:].clone()
        labels[:, : PROMPT - 1] = IGNORE_INDEX
        return {"input_ids": ids[:, :-1].contiguous(), "labels": labels}

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.queue:
            whole = self._global()
            self.step += 1
            share = whole["input_ids"].shape[0] // self.dp_size
            mine = {k: v[self.dp_rank * share : (self.dp_rank + 1) * share] for k, v in whole.items()}
            self.queue = [{k: v[i : i + self.micro] for k, v in mine.items()} for i in range(0, share, self.micro)]
        return self.queue.pop(0)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def train(overrides: list[str], run_dir: Path) -> None:
    """Build and train `overrides` on this process's WORLD_SIZE (the process group may already be up)."""
    from llmhpc.config import load_config
    from llmhpc.parallel import dp_rank, dp_size
    from llmhpc.train.builder import build, distributed_run
    from llmhpc.train.trainer import Trainer

    cfg = load_config("pretrain", [*COMMON, *overrides, f"run.dir={run_dir}"])
    with distributed_run(cfg) as where:
        built = build(cfg, where)
        batches = PairBatches(built.cfg.trainer.micro_batch_size, dp_rank(where.mesh), dp_size(where.mesh))
        trainer = Trainer(built.cfg, built.engine, batches, PairwiseLogSigmoid(), components=built.components,
                          lr_scales=built.lr_scales)
        try:
            trainer.fit()
        finally:
            built.engine.close()


def records(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llmhpc_cache) -> dict[str, dict[int, dict[str, float]]]:
    """{layout: {step: record}}: the one-process run here, every 2-process layout in one torchrun launch."""
    import subprocess

    from tests.conftest import cli_env

    pytest.importorskip("deepspeed", reason="DeepSpeed is the [deepspeed] extra (tools/install.sh installs it)")
    root = tmp_path_factory.mktemp("objective")
    train([], root / "single")
    env = dict(cli_env(llmhpc_cache), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               str(root)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {name: records(root / name) for name in ["single", *LAYOUTS]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_objective_matches_one_process(runs, layout: str) -> None:
    expected, got = runs["single"], runs[layout]
    assert sorted(got) == list(range(1, STEPS + 1))
    for key in ("loss", "accuracy", "margin"):
        diff = max(abs(got[s][key] - expected[s][key]) for s in got)
        print(f"{layout}: max |{key} - one process| = {diff:.2e}")
        assert diff < TOL, (key, [(got[s][key], expected[s][key]) for s in got])
    assert expected[STEPS]["loss"] < expected[1]["loss"], "the objective must train"
    assert {0.0 < expected[s]["accuracy"] < 1.0 for s in expected} & {True}, "accuracy must be a real metric"


def main(root: str) -> None:
    """torchrun worker: every 2-process layout, one after the other, on the same process group."""
    import gc

    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for name, overrides in LAYOUTS.items():
        train(overrides, Path(root) / name)
        gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1])
