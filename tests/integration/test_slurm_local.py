"""The local Slurm of `tools/slurm_local.sh`: a real slurmctld + slurmd + munge that jobs are submitted to.

Checked on the real thing: `llmhpc submit` sends a 2-process pretraining job (`slurm/stage.sbatch`: torchrun
under srun, c10d rendezvous on the job's first host); sent USR1 mid-run (`scancel --batch --signal=USR1`, what
`--signal=B:USR1@N` delivers before the time limit) it checkpoints the step in flight, requeues itself, resumes and
completes with bitwise the losses and weights of an uninterrupted 2-process run and one W&B run id; a batch job's two
tasks start as Slurm ranks 0 and 1 and join one torch.distributed gloo group through the environment Slurm gives
them; a job out of requeues checkpoints and ends failed saying why; a chain runs its stages in order, each from the
one before, and cancels the rest when one fails. The fixture starts the cluster (about 15 s, once); it needs root
and apt-get, and skips only where the packages cannot be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmhpc.metrics.jsonl import read_metrics
from tests.conftest import SMALL_RUN, cli_env
from tests.distributed.launch import final_weights, run_torchrun, step_losses

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


@pytest.mark.slow  # CI time: tier 1 checkpoints on USR1 and ends failed out of requeues
def test_submitted_job_sent_usr1_checkpoints_requeues_and_ends_as_if_uninterrupted(slurm, tmp_path, llmhpc_cache):
    steps = 30
    common = [*SMALL_RUN, f"trainer.max_steps={steps}", "trainer.ckpt_every=0", "parallel.dp_shard=2",
              "trainer.micro_batch_size=2"]
    reference = tmp_path / "reference"
    run_torchrun(2, ["pretrain", *common, f"run.dir={reference}"], llmhpc_cache)
    run_dir = tmp_path / "slurm_run"
    env = dict(cli_env(llmhpc_cache), OMP_NUM_THREADS="1", LLMHPC_RDZV_PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run(
        [sys.executable, "-m", "llmhpc", "submit", "pretrain", *common, f"run.dir={run_dir}", "cluster.gpus_per_node=0",
         "cluster.workers_per_node=2", "cluster.time=00:10:00"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
    log = run_dir / "slurm" / f"{job}.out"
    assert f"log {log}" in proc.stdout
    assert (run_dir / "slurm" / "pretrain.sbatch").is_file() and (run_dir / "slurm" / "config.yaml").is_file()

    metrics = run_dir / "metrics.jsonl"
    _wait(job, lambda s: s["JobState"] != "PENDING" and metrics.exists() and 2 <= len(read_metrics(metrics)),
          timeout=300)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    _wait(job, lambda s: s["JobState"] == "PENDING" and int(s.get("Restarts", 0)) >= 1, timeout=180)
    stopped_at = max(step_losses(run_dir))
    assert 2 <= stopped_at < steps, log.read_text()[-4000:]
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    state = _wait(job, lambda s: s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) == 1, text[-4000:]
    assert state["TimeLimit"] == "00:10:00"
    assert "stage pretrain: 1 node(s) x 2 worker(s)" in text and "parallel.dp_shard=2" in text
    assert "llmhpc: resolved config:\n    stage: pretrain\n" in text and "    micro_batch_size: 2\n" in text
    assert f"stopped step={stopped_at} from=0" in text and "requeueing job" in text, text[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:07d}" in text and "attempt 2 (requeued 1" in text
    got, expected = step_losses(run_dir), step_losses(reference)
    assert sorted(got) == list(range(1, steps + 1))
    assert [step for step in expected if got[step] != expected[step]] == []
    ref_weights, new_weights = final_weights(reference), final_weights(run_dir)
    assert all(torch.equal(ref_weights[name], new_weights[name]) for name in ref_weights)
    # The same W&B run id across the requeue (it is kept in every checkpoint).
    run_ids = {json.loads((c / "meta.json").read_text())["wandb_run_id"]
               for c in (run_dir / "checkpoints").iterdir() if (c / "meta.json").exists()}
    assert len(run_ids) == 1


def test_a_job_out_of_requeues_checkpoints_and_ends_failed_saying_why(slurm, tmp_path, llmhpc_cache):
    run_dir = tmp_path / "run"
    proc = _submit(["pretrain", *SMALL_RUN, "trainer.max_steps=100000", "trainer.ckpt_every=0", f"run.dir={run_dir}",
                    "cluster.gpus_per_node=0", "cluster.workers_per_node=1", "cluster.max_requeues=0"], llmhpc_cache)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
    metrics = run_dir / "metrics.jsonl"
    _wait(job, lambda s: s["JobState"] != "PENDING" and metrics.exists() and len(read_metrics(metrics)) >= 2,
          timeout=300)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state = _wait(job, lambda s: s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=180)
    text = (run_dir / "slurm" / f"{job}.out").read_text()
    assert state["JobState"] == "FAILED" and int(state["Restarts"]) == 0, text[-3000:]
    stopped_at = max(step_losses(run_dir))
    assert "llmhpc: not requeued: already requeued 0 times (LLMHPC_MAX_REQUEUES)" in text, text[-3000:]
    assert (run_dir / "checkpoints" / f"step_{stopped_at:07d}").is_dir()  # the work done is kept


def _submit(args: list[str], cache: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(cli_env(cache), OMP_NUM_THREADS="1", LLMHPC_RDZV_PORT=str(28500 + os.getpid() % 1000))
    return subprocess.run([sys.executable, "-m", "llmhpc", "submit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_chain_runs_stage_two_after_stage_one_from_its_checkpoint_and_never_after_a_failure(slurm, tmp_path,
                                                                                            llmhpc_cache):
    one_cpu = ["cluster.gpus_per_node=0", "cluster.workers_per_node=1", "cluster.time=00:10:00"]
    first, second, export = tmp_path / "first", tmp_path / "second", tmp_path / "export-hf"
    proc = _submit(["chain", "pretrain", *SMALL_RUN, "trainer.max_steps=3", f"run.dir={first}", *one_cpu,
                    "pretrain", *SMALL_RUN, "trainer.max_steps=2", f"run.dir={second}", *one_cpu,
                    "convert", "to=hf", f"dst={export}"], llmhpc_cache)
    assert proc.returncode == 0, proc.stderr
    jobs = proc.stdout.split("submitted jobs ", 1)[1].split(":", 1)[0].split(" -> ")
    assert len(jobs) == 3
    assert _job_state(jobs[1])["Dependency"].startswith(f"afterok:{jobs[0]}")
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    one, two, three = (_wait(job, lambda s: s["JobState"] in done, timeout=600) for job in jobs)
    assert one["JobState"] == two["JobState"] == "COMPLETED", (second / "slurm" / f"{jobs[1]}.out").read_text()[-3000:]
    assert three["JobState"] == "COMPLETED", (tmp_path / "export-hf.slurm" / f"{jobs[2]}.out").read_text()[-3000:]
    assert one["EndTime"] <= two["StartTime"] and two["EndTime"] <= three["StartTime"]
    meta = json.loads((second / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["lineage"]["init_from"] == str(first.resolve())  # stage 2 started from stage 1's checkpoint
    # ... and stage 3 converted stage 2's last step: transformers' weights are that checkpoint's.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).state_dict()
    trained = final_weights(second)
    assert torch.equal(exported["model.embed_tokens.weight"], trained["tok_embeddings.weight"])

    # A first stage that fails (its model.init_from does not exist): the second is cancelled, never started.
    bad, after = tmp_path / "bad", tmp_path / "after"
    proc = _submit(["chain", "pretrain", *SMALL_RUN, f"model.init_from={tmp_path / 'missing'}", f"run.dir={bad}",
                    *one_cpu, "pretrain", *SMALL_RUN, f"run.dir={after}", *one_cpu], llmhpc_cache)
    assert proc.returncode == 0, proc.stderr
    jobs = proc.stdout.split("submitted jobs ", 1)[1].split(":", 1)[0].split(" -> ")
    one, two = (_wait(job, lambda s: s["JobState"] in done, timeout=300) for job in jobs)
    assert one["JobState"] == "FAILED" and two["JobState"] == "CANCELLED", (one, two)
    assert not (after / "metrics.jsonl").exists() and not (after / "slurm" / f"{jobs[1]}.out").exists()
