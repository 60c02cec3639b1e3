"""A W&B offline run: the logged config and metrics read back from the run's files, and a
resumed run continues the same W&B run id."""

from __future__ import annotations

import pytest

from llmhpc.metrics.jsonl import read_metrics
from tests.conftest import SMALL_RUN, run_cli
from tests.wandb_offline import read_offline_run


def test_offline_run_logs_config_and_metrics_and_keeps_its_id_on_resume(tmp_path, llmhpc_cache):
    run_dir = tmp_path / "wb"
    common = ["pretrain", *SMALL_RUN, "logger.wandb.mode=offline", "logger.wandb.project=llmhpc-test",
              "logger.wandb.tags=[ci,tiny]", f"run.dir={run_dir}", "trainer.ckpt_every=3"]
    run_cli([*common, "trainer.max_steps=3"], llmhpc_cache)
    first = read_offline_run(run_dir)
    run_cli([*common, "trainer.max_steps=6"], llmhpc_cache)  # same dir: resumes at step 3
    both = read_offline_run(run_dir)

    assert first["run_id"] and both["run_id"] == first["run_id"]
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2
    config = both["config"]
    assert config["model"]["dim"] == 64 and config["trainer"]["max_steps"] in (3, 6)
    assert config["logger"]["wandb"]["tags"] == ["ci", "tiny"]

    logged = {row["_step"]: row for row in both["history"] if "loss" in row}
    local = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(logged) == sorted(local) == [1, 2, 3, 4, 5, 6]
    for step, record in local.items():
        assert logged[step]["loss"] == pytest.approx(record["loss"], rel=1e-12)
        assert logged[step]["lr"] == pytest.approx(record["lr"], rel=1e-12)
        assert "tokens_per_s" in logged[step] and "mfu" in logged[step]
