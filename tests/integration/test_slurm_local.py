"""The local Slurm of `tools/slurm_local.sh`: a real slurmctld + slurmd + munge that jobs are submitted to.

Checked on the real thing: `llmhpc submit` sends a 2-process pretraining job (`slurm/stage.sbatch`: torchrun
under srun, c10d rendezvous on the job's first host) that completes and trains the losses of one process; a batch
job's two tasks start as Slurm ranks 0 and 1 and join one torch.distributed gloo group through the environment
Slurm gives them; a job sent USR1 runs its trap, requeues itself and comes back as restart 1. The fixture starts
the cluster (about 15 s, once); it needs root and apt-get, and skips only where the packages cannot be installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SMALL_RUN, cli_env, run_cli
from tests.distributed.launch import step_losses

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or shutil.which("apt-get") is None,
                                reason="the local Slurm needs Linux, root and apt-get (tools/slurm_local.sh)")


@pytest.fixture(scope="module")
def slurm():
    proc = subprocess.run(["bash", str(REPO / "tools" / "slurm_local.sh")], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"tools/slurm_local.sh could not install Slurm here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]


def _job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait(job: str, done: Callable[[dict[str, str]], bool], timeout: float = 180) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job)
        if done(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state.get('JobState')} after {timeout} s")


def test_two_tasks_are_ranks_of_one_gloo_group(slurm, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2 --cpus-per-task=1 --output={tmp_path}/out.txt
export MASTER_ADDR=127.0.0.1 MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
srun {sys.executable} -c '
import os, torch, torch.distributed as dist
dist.init_process_group("gloo", rank=int(os.environ["SLURM_PROCID"]), world_size=int(os.environ["SLURM_NTASKS"]))
x = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(x)
print(f"rank {{dist.get_rank()}} of {{dist.get_world_size()}} sum {{x.item():g}}")
dist.destroy_process_group()
'
""")
    proc = subprocess.run(["sbatch", "--wait", str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, (proc.stderr, (tmp_path / "out.txt").read_text() if (tmp_path / "out.txt").exists()
                                  else "")
    lines = sorted(line for line in (tmp_path / "out.txt").read_text().splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 of 2 sum 3", "rank 1 of 2 sum 3"]


def test_usr1_requeues_the_job_which_comes_back_as_restart_1(slurm, tmp_path):
    log = tmp_path / "log.txt"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=1 --requeue --signal=B:USR1@60 --open-mode=append --output={tmp_path}/slurm.out
echo "start restart=${{SLURM_RESTART_COUNT:-0}}" >> {log}
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "done" >> {log}; exit 0; fi
trap 'echo "usr1" >> {log}; scontrol requeue $SLURM_JOB_ID; exit 0' USR1
sleep 300 &
wait
""")
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout.strip().split(";")[0]
    _wait(job, lambda s: s["JobState"] == "RUNNING" and log.exists())
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    # A requeued job waits for its BeginTime; release it at once (tools/slurm_local.sh shortens the rest).
    _wait(job, lambda s: s["JobState"] == "PENDING" or int(s.get("Restarts", 0)) >= 1, timeout=60)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    state = _wait(job, lambda s: s["JobState"] == "COMPLETED", timeout=180)
    assert int(state["Restarts"]) == 1
    assert log.read_text().split() == ["start", "restart=0", "usr1", "start", "restart=1", "done"]


def test_submitted_two_process_pretraining_trains_the_losses_of_one(slurm, tmp_path, llmhpc_cache):
    common = [*SMALL_RUN, "trainer.max_steps=3", "trainer.global_batch_size=8", "trainer.ckpt_every=0"]
    single = tmp_path / "single"
    run_cli(["pretrain", *common, "trainer.micro_batch_size=4", f"run.dir={single}"], llmhpc_cache)
    run_dir = tmp_path / "slurm_run"
    env = dict(cli_env(llmhpc_cache), OMP_NUM_THREADS="1", LLMHPC_RDZV_PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run(
        [sys.executable, "-m", "llmhpc", "submit", "pretrain", *common, "parallel.dp_shard=2",
         "trainer.micro_batch_size=2", f"run.dir={run_dir}", "cluster.gpus_per_node=0", "cluster.workers_per_node=2",
         "cluster.time=00:10:00"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
    log = run_dir / "slurm" / f"{job}.out"
    assert f"log {log}" in proc.stdout
    assert (run_dir / "slurm" / "pretrain.sbatch").is_file() and (run_dir / "slurm" / "config.yaml").is_file()
    state = _wait(job, lambda s: s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600)
    assert state["JobState"] == "COMPLETED", log.read_text()[-4000:]
    assert state["TimeLimit"] == "00:10:00"
    header = log.read_text()
    assert "stage pretrain: 1 node(s) x 2 worker(s)" in header and "parallel.dp_shard=2" in header
    got, expected = step_losses(run_dir), step_losses(single)
    assert sorted(got) == [1, 2, 3]
    assert max(abs(got[s] - expected[s]) for s in got) < 1e-5
