"""`llmhpc submit` without a cluster: the script it renders from `cluster.*`, and what it refuses in one line.

The real submission (a job that runs and trains) is in tests/integration/test_slurm_local.py.
"""

from __future__ import annotations

import shlex
import subprocess

import pytest

from llmhpc.cli import main
from llmhpc.stages.submit import TEMPLATE
from tests.conftest import REPO, one_line_error

TINY = ["model=tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"]


def test_dry_run_renders_cluster_options_and_bakes_in_the_overrides(capsys, tmp_path):
    run_dir = tmp_path / "run one"
    argv = ["submit", "pretrain", *TINY, "trainer.max_steps=7", f"run.dir={run_dir}", "cluster.nodes=2",
            "cluster.gpus_per_node=4", "cluster.partition=gpu", "cluster.account=proj", "cluster.qos=high",
            "cluster.time=1-00:00:00", "cluster.signal_lead_s=600", "cluster.max_requeues=5", "parallel.dp_shard=8",
            "--dry-run"]
    assert main(argv) == 0
    script = capsys.readouterr().out
    directives = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["--job-name=llmhpc-pretrain", "--nodes=2", "--ntasks-per-node=1", "--time=1-00:00:00",
                          f'--output="{run_dir}/slurm/%j.out"', "--open-mode=append", "--requeue",
                          "--signal=B:USR1@600", "--gpus-per-node=4", "--exclusive",
                          "--partition=gpu", "--account=proj", "--qos=high"]
    assert "export LLMHPC_PROCS_PER_NODE=4" in script.splitlines()
    assert "export LLMHPC_MAX_REQUEUES=5" in script.splitlines()
    assert f"export LLMHPC_STOP_FILE='{run_dir}/slurm'/stop-\"$SLURM_JOB_ID\"" in script.splitlines()
    stage_line = next(line for line in script.splitlines() if line.startswith("set -- "))
    assert shlex.split(stage_line)[2:] == ["pretrain", *TINY, "trainer.max_steps=7", f"run.dir={run_dir}",
                                           "parallel.dp_shard=8"]  # cluster.* stay out of the job's overrides
    assert script.endswith(TEMPLATE.read_text()[TEMPLATE.read_text().index("set -euo pipefail"):])
    assert not run_dir.exists()  # a dry run writes nothing
    # The rendered script is valid bash.
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0


def test_the_source_tree_template_is_the_packaged_one():
    assert (REPO / "slurm" / "stage.sbatch").resolve() == TEMPLATE.resolve()


@pytest.mark.parametrize(("args", "mentions"), [
    (["model=tiny"], ["name the stage"]),
    (["plan", "model=tiny"], ["'plan' is not a stage", "pretrain"]),
    (["pretrain", *TINY, "parallel.tp=3", "cluster.gpus_per_node=0", "cluster.workers_per_node=3"],
     ["parallel.tp=3", "n_heads"]),
    (["pretrain", *TINY, "cluster.gpus_per_node=0"], ["cluster.workers_per_node"]),
    (["pretrain", *TINY, "cluster.nodez=2"], ["cluster.nodez", "cluster.nodes"]),
    (["pretrain", "model=llama3_70b", "cluster=h100_8x8", "parallel.dp_shard=1", "parallel.dp_replicate=64",
      "trainer.global_batch_size=64"], ["planner", "GiB", "llmhpc plan"]),
])
def test_bad_submissions_are_refused_in_one_line_and_write_nothing(capsys, tmp_path, args, mentions):
    run_dir = tmp_path / "run"
    one_line_error(capsys, ["submit", *args, f"run.dir={run_dir}"], *mentions)
    assert not run_dir.exists()


def test_without_sbatch_the_error_says_how_to_get_slurm(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    one_line_error(capsys, ["submit", "pretrain", *TINY, "cluster.gpus_per_node=0", "cluster.workers_per_node=1",
                            f"run.dir={tmp_path / 'run'}"], "sbatch not found", "tools/slurm_local.sh")


def test_help_says_how_it_is_called_and_lists_the_cluster_keys(capsys):
    assert main(["submit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "llmhpc submit STAGE [key=value ...] [cluster.key=value ...] [--dry-run | --multirun]" in out
    assert "llmhpc submit chain STAGE [key=value ...] STAGE [key=value ...]" in out
    assert "cluster.partition" in out and "cluster.workers_per_node" in out and "cluster.max_requeues" in out


def test_chain_dry_run_feeds_each_stage_the_one_before_and_refuses_shared_outputs(capsys, tmp_path):
    cpu = ["cluster.gpus_per_node=0", "cluster.workers_per_node=1"]
    first, second, export = tmp_path / "pt", tmp_path / "sft", tmp_path / "x-hf"
    assert main(["submit", "chain", "pretrain", *TINY, f"run.dir={first}", *cpu, "sft", *TINY, f"run.dir={second}",
                 *cpu, "convert", "to=hf", f"dst={export}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    stages = [shlex.split(line)[2:] for line in out.splitlines() if line.startswith("set -- ")]
    assert [s[0] for s in stages] == ["pretrain", "sft", "convert"]
    assert stages[1][-1] == f"model.init_from={first}" and stages[2][-1] == f"src={second}"
    assert f"--output={export}.slurm/%j.out" in out and not first.exists()  # a dry run writes nothing
    one_line_error(capsys, ["submit", "chain", "pretrain", *TINY, f"run.dir={first}", *cpu, "pretrain", *TINY,
                            f"run.dir={first}", *cpu], "both write", "own run.dir")
    one_line_error(capsys, ["submit", "chain", "pretrain", *TINY, f"run.dir={first}", *cpu], "two stages or more")
