"""Stop a run cleanly when asked: finish the step, write a checkpoint, report how far it got.

Two ways to ask, because of how Slurm delivers a preemption or time-limit warning:

- a signal to the training processes themselves: SIGTERM (what `scancel`, a time limit or a node shutdown sends to
  every process of the job) or SIGUSR1; a second one of the same kind acts as it did before (so a second Ctrl-C-like
  SIGTERM still kills a stuck run);
- the stop file: `sbatch --signal=B:USR1@N` warns only the batch shell, which cannot forward a signal through
  `srun` and torchrun to every worker on every node, so `slurm/stage.sbatch` traps it and creates the file named
  by $LLMHPC_STOP_FILE (on the shared filesystem) instead; rank 0 looks for it after every step.

Every rank must stop after the same step (a checkpoint is collective), so the ranks agree after each step with one
all-reduce of a flag. When the run stops, rank 0 writes one line to the stop file for the job script, which decides
whether to requeue the job: `stopped step=N from=M checkpoint=PATH` when the run saved a step past the one it
started from, `finished step=N ...` when the last step was reached anyway. A run that fails before it gets
through a step leaves the file empty, and the job is not requeued (so it cannot requeue itself forever).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from llmhpc.process_group import is_main_process

STOP_FILE_ENV = "LLMHPC_STOP_FILE"
"""Environment variable naming the stop file (set by slurm/stage.sbatch; unset: signals only)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

STOPPED_EXIT_CODE = 75
"""Exit status of a stage that stopped early on request outside torchrun (EX_TEMPFAIL: run it again to resume), so
that `llmhpc pretrain ... && llmhpc convert ...` does not go on with an unfinished run. Under torchrun a worker
exits 0 (a non-zero worker makes torchrun kill its peers and report a failure); the stop file tells the job."""

_REASONS = {1: "SIGTERM", 2: "SIGUSR1", 3: "a stop request from the job script"}


class StopRequests:
    """Watches for requests to stop during `Trainer.fit`; use as a context manager around the loop."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stop_file = Path(os.environ[STOP_FILE_ENV]) if os.environ.get(STOP_FILE_ENV) else None
        self._received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received = max(self._received, 1 if signum == signal.SIGTERM else 2)
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))  # a second one acts as before

    def requested(self) -> str | None:
        """Why the run should stop now (the same answer on every rank), or None. Collective: every rank calls it
        after the same step."""
        flag = self._received
        if not flag and self.stop_file is not None and is_main_process() and self.stop_file.exists():
            flag = 3
        if dist.is_initialized():
            shared = torch.tensor([flag], dtype=torch.int32, device=self.device)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            flag = int(shared.item())
        return _REASONS.get(flag)

    def report(self, verdict: str, step: int, started_from: int, checkpoint: Path | None) -> None:
        """Rank 0: write `verdict step=N from=M checkpoint=PATH` to the stop file for the job script."""
        if self.stop_file is None or not is_main_process():
            return
        line = f"{verdict} step={step} from={started_from} checkpoint={checkpoint or ''}\n"
        partial = self.stop_file.with_name(self.stop_file.name + ".partial")
        partial.write_text(line, encoding="utf-8")
        partial.replace(self.stop_file)  # the script never reads half a line
