"""`llmhpc submit ... --multirun`: a Hydra sweep sent to Slurm as one submitit array job (llmhpc.stages.sweep).

Checked on the local Slurm of tools/slurm_local.sh: a 2-point learning-rate sweep is one array job whose two tasks
complete, each point trains in its own `<run.dir>/<index>` with its own learning rate, and a point's losses are those
of the same run started by hand. Without Slurm: the dry run lists the points of a 2x2 sweep in Hydra's BasicSweeper
order, a sweep with one invalid point (or no swept key, a swept cluster key, too many points) is refused in one line
and submits nothing, and a failing point raises with the tail of its output (what submitit records as the failure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from llmhpc.cli import main
from llmhpc.metrics.jsonl import read_metrics
from llmhpc.stages.sweep import PointRun, expand, timeout_minutes
from tests.conftest import REPO, SMALL_RUN, cli_env, one_line_error, run_cli
from tests.distributed.launch import step_losses
from tests.integration.test_slurm_local import _wait, slurm  # noqa: F401
from tests.integration.test_slurm_local import pytestmark as needs_local_slurm

TINY = ["model=tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"]
CPU_CLUSTER = ["cluster.gpus_per_node=0", "cluster.workers_per_node=1", "cluster.time=00:10:00"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def test_dry_run_lists_the_points_of_a_2x2_sweep_in_hydras_order(capsys, tmp_path):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = tmp_path / "sweep"
    sweep = ["trainer.lr=1e-3,2e-3", "trainer.max_steps=range(2,4)"]
    assert main(["submit", "pretrain", *TINY, *sweep, f"run.dir={run_dir}", *CPU_CLUSTER, "--multirun",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert rows == [[str(i), str(run_dir / str(i)), f"trainer.lr={lr}", f"trainer.max_steps={steps}"]
                    for i, (lr, steps) in enumerate([(0.001, 2), (0.001, 3), (0.002, 2), (0.002, 3)])]
    assert "4 points as one Slurm array job" in out and "name=llmhpc-pretrain-sweep" in out
    assert "nodes=1 tasks_per_node=1 timeout_min=10" in out
    assert not run_dir.exists()  # a dry run writes nothing
    # The points are Hydra's own: BasicSweeper's cartesian product, in its order.
    given = [*TINY, *sweep]
    hydra_points = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(given), None)[0]
    assert expand(given)[0] == hydra_points


def test_a_sweep_with_one_invalid_point_is_refused_in_one_line_and_submits_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # sbatch (real or not) is out of reach: nothing could be submitted
    run_dir = tmp_path / "sweep"
    one_line_error(capsys, ["submit", "pretrain", *TINY, "model.n_heads=4,3", f"run.dir={run_dir}", *CPU_CLUSTER,
                            "--multirun"], "sweep point 1", "model.n_heads=3", "nothing submitted")
    assert not run_dir.exists()


@pytest.mark.parametrize(("args", "mentions"), [
    (["trainer.lr=1e-3"], ["needs a swept key", "trainer.lr=1e-3,3e-3"]),
    (["trainer.lr=1e-3,2e-3", "cluster.nodes=1,2"], ["cluster.nodes cannot be swept"]),
    (["trainer.max_steps=range(1,300)"], ["299 points", "256"]),
    (["trainer.lr=interval(0,1)"], ["not a list of values"]),
    (["trainer.lr=1e-3,2e-3", "cluster.time=soon"], ["cluster.time='soon'", "04:00:00"]),
])
def test_sweeps_that_cannot_be_one_array_job_are_refused(capsys, tmp_path, args, mentions):
    run_dir = tmp_path / "sweep"
    given = {a.split("=", 1)[0] for a in args}
    cluster = [c for c in CPU_CLUSTER if c.split("=", 1)[0] not in given]
    one_line_error(capsys, ["submit", "pretrain", *TINY, *args, f"run.dir={run_dir}", *cluster, "--multirun"],
                   *mentions)
    assert not run_dir.exists()


@pytest.mark.parametrize(("time", "minutes"), [("04:00:00", 240), ("2-00:00:00", 2880), ("10", 10), ("10:30", 11),
                                               ("1-2", 1560), ("1-02:03", 1563), ("00:00:30", 1)])
def test_slurm_time_limits_become_whole_minutes(time, minutes):
    assert timeout_minutes(time) == minutes


def test_a_failing_point_raises_with_the_tail_of_its_output(tmp_path, monkeypatch):
    for name in ("SLURM_JOB_NODELIST", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 1.*error: unknown model preset 'nope'"):
        PointRun()("pretrain", ["model=nope", f"run.dir={tmp_path / 'run'}"], 1, 30500 + os.getpid() % 1000,
                  str(REPO))


def _array_tasks(job: str) -> list[dict[str, str]]:
    """`scontrol show job JOB`: one record per task of an array job (one for the whole array while pending)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return [dict(f.split("=", 1) for f in record.split() if "=" in f) for record in out.split("\n\n") if record.strip()]


@needs_local_slurm
@pytest.mark.usefixtures("slurm")
@pytest.mark.slow  # CI time: tier 1 keeps the sweep's dry run and refusals, and Slurm runs in test_slurm_local
def test_a_two_point_sweep_is_one_array_job_whose_points_train_like_local_runs(tmp_path, llmhpc_cache, monkeypatch):
    """...and a point sent the warning signal mid-run checkpoints, is requeued and ends as if uninterrupted."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in the jobs: the same GEMM reduction order, the same bits
    run_cli(["data", "prepare"], llmhpc_cache)  # the corpus, once, before the runs read it at the same time
    steps = 30
    common = [*SMALL_RUN, f"trainer.max_steps={steps}", "trainer.ckpt_every=0"]
    sweep = tmp_path / "sweep"
    port = 29500 + os.getpid() % 1000
    env = dict(cli_env(llmhpc_cache), LLMHPC_RDZV_PORT=str(port))
    proc = subprocess.run(
        [sys.executable, "-m", "llmhpc", "submit", "pretrain", *common, "trainer.lr=1e-3,5e-3", f"run.dir={sweep}",
         *CPU_CLUSTER, "--multirun"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
    log_dir = sweep / "slurm"
    assert f"log {log_dir}" in proc.stdout
    # Point 0 gets Slurm's warning signal (submitit's USR2, to every process of the task) after its second step.
    metrics = sweep / "0" / "metrics.jsonl"
    _wait(f"{job}_0", lambda s: s["JobState"] == "RUNNING" and metrics.exists() and len(read_metrics(metrics)) >= 2,
          timeout=300)
    subprocess.run(["scancel", "--signal=USR2", f"{job}_0"], check=True)
    local = {lr: tmp_path / f"local-{lr}" for lr in ("1e-3", "5e-3")}  # the points started by hand, meanwhile
    for lr, run_dir in local.items():
        run_cli(["pretrain", *common, f"trainer.lr={lr}", f"run.dir={run_dir}"], llmhpc_cache)
    _wait(f"{job}_0", lambda s: s["JobState"] == "PENDING" and int(s.get("Restarts", 0)) >= 1
          or s["JobState"] in DONE, timeout=180)
    subprocess.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"], capture_output=True)
    states = {task: _wait(f"{job}_{task}", lambda s: s["JobState"] in DONE, timeout=300) for task in (0, 1)}
    logs = {task: (log_dir / f"{job}_{task}_0_log.out").read_text() for task in (0, 1)}
    for task, state in states.items():
        assert state["JobState"] == "COMPLETED", logs[task][-4000:]
    assert [int(states[task]["Restarts"]) for task in (0, 1)] == [1, 0]
    assert "llmhpc: stopped step=" in logs[0] and "requeueing" in logs[0] and "attempt 2" in logs[0], logs[0][-4000:]
    # One array job: both tasks carry its id, its name and the time limit of cluster.time.
    records = _array_tasks(job)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    assert {(r["ArrayJobId"], r["JobName"], r["TimeLimit"]) for r in records} == {
        (job, "llmhpc-pretrain-sweep", "00:10:00")}
    # Each task ran its point through torchrun, on its own rendezvous port.
    for task in (0, 1):
        assert f"job {job}_{task} stage pretrain: 1 node(s) x 1 worker(s), rendezvous localhost:{port + task}" \
            in logs[task]
    record = json.loads((log_dir / "sweep.json").read_text())
    assert record["array_job_id"] == job
    assert [(p["index"], p["run_dir"], p["swept"]) for p in record["points"]] == [
        (0, str(sweep / "0"), ["trainer.lr=0.001"]), (1, str(sweep / "1"), ["trainer.lr=0.005"])]
    # Each point in its own run directory, with its own learning rate, training the losses of the same run by hand
    # (point 0 across its requeue).
    losses = {}
    for index, lr in ((0, "1e-3"), (1, "5e-3")):
        assert OmegaConf.load(sweep / str(index) / "config.yaml").trainer.lr == pytest.approx(float(lr))
        losses[index] = step_losses(sweep / str(index))
        assert sorted(losses[index]) == list(range(1, steps + 1))
        assert losses[index] == step_losses(local[lr]), index
    # Same seed, weights and data: the first loss is the same; the learning rate shows from step 2 on.
    assert abs(losses[0][1] - losses[1][1]) < 1e-6
    assert abs(losses[0][2] - losses[1][2]) > 1e-3
