"""The one training loop every stage uses.

A stage hands the trainer an engine (the laid-out model, its optimizer and how a step runs on the parallel
backend; see `llmhpc.train.engine`, built by `llmhpc.train.builder`), the checkpoint components, a batch
source with a resumable position and an objective; the trainer owns everything else: learning-rate
schedule, gradient accumulation, clipping, the non-finite guard, eval, logging of the loss and the
objective's metrics, and checkpoints. The same loop therefore serves pretraining, SFT, LoRA and the RL stages.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from llmhpc.checkpoint import CheckpointManager, Component
from llmhpc.checkpoint.manager import step_dir_name
from llmhpc.config.load import to_dict, to_yaml
from llmhpc.config.schema import Config
from llmhpc.errors import TrainingAborted
from llmhpc.metrics.console import ConsoleProgress
from llmhpc.metrics.jsonl import JsonlLogger, truncate_after
from llmhpc.metrics.mfu import peak_flops
from llmhpc.metrics.wandb_logger import WandbLogger, new_run_id
from llmhpc.process_group import is_main_process
from llmhpc.train.engine import Engine, StepSums
from llmhpc.train.heartbeat import Heartbeat
from llmhpc.train.objective import Objective, labelled_tokens, processed_tokens
from llmhpc.train.preemption import STOPPED_EXIT_CODE, StopRequests
from llmhpc.train.schedule import set_lr

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """Where training batches come from; its position is saved in every checkpoint, per rank.

    A source that makes its batches (RL rollouts) may also have `metrics() -> dict[str, float]`: numbers about
    the batches of the last step (the same on every rank), logged with the step's."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    """What a finished `fit` reports."""

    step: int
    """Optimizer steps completed."""
    resumed_from: int | None
    """Step of the checkpoint this run resumed from, or None for a fresh start."""
    last_loss: float
    """Training loss of the last step."""
    eval_loss: float | None
    """Last held-out loss, if eval ran."""
    checkpoint: Path | None
    """Newest checkpoint written."""
    stopped: str | None = None
    """Why the run stopped before trainer.max_steps (e.g. 'SIGUSR1'; a checkpoint of that step was written), or
    None when it reached them."""


def report_done(cfg: Config, result: TrainResult) -> int:
    """Rank 0 (the process group is gone: torchrun's RANK says who): one line saying where the run ended; returns
    the stage's exit status: 0, or STOPPED_EXIT_CODE for a run stopped early outside torchrun."""
    if os.environ.get("RANK", "0") == "0":
        head = f"stopped on {result.stopped}" if result.stopped else "done"
        print(f"{head}: step {result.step}, loss {result.last_loss:.4f}"
              + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
              + (f", checkpoint {result.checkpoint}" if result.checkpoint else "")
              + (f", adapter {Path(cfg.run.dir) / 'adapter'}" if cfg.peft.name != "none" else "")
              + ("; run the same command to resume" if result.stopped else ""), flush=True)
    return STOPPED_EXIT_CODE if result.stopped and "TORCHELASTIC_RUN_ID" not in os.environ else 0


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is available; use run.device=cpu or auto")
    return torch.device(name)


def _means(sums: StepSums, count: float) -> tuple[float, dict[str, float]]:
    """(loss / count, {metric: its sum / its count}) of reduced sums."""
    loss = float(sums.loss) / max(count, 1)
    return loss, {name: float(total) / max(float(n), 1e-30) for name, (total, n) in sums.metrics.items()}


class Trainer:
    """Runs `cfg.trainer.max_steps` optimizer steps of `objective`, resuming from the newest checkpoint."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        batches: BatchSource,
        objective: Objective,
        *,
        components: list[Component] | None = None,
        eval_batches: list[Batch] | None = None,
        flops_per_token: float | None = None,
        lineage: dict | None = None,
        lr_scales: list[float] | None = None,
        evaluators: Sequence[Callable[[nn.Module], dict[str, float]]] = (),
    ):
        self.cfg = cfg
        self.engine = engine
        self.model = engine.model
        self.batches = batches
        self.objective = objective
        self.components = components or [
            Component("model", engine.model, engine.optimizer, **engine.checkpoint_converters())
        ]
        """What checkpoints hold; the default is the engine's model and optimizer as component 'model'."""
        self.eval_set = eval_batches or []
        """Held-out batches, the same on every rank."""
        self.evaluators = list(evaluators)
        """Run on the model (in eval mode, on every rank) at each eval: {'eval_<name>': value} to log, e.g. greedy
        answer accuracy on held-out problems."""
        self.flops_per_token = flops_per_token
        self.lineage = lineage or {}
        self.lr_scales = lr_scales
        """Per param group multipliers of the scheduled learning rate (None: 1 for every group)."""
        self.device = next(self.model.parameters()).device
        self.run_dir = Path(cfg.run.dir)
        self.dp = engine.dp
        self.main = is_main_process()
        self.accum_steps = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * self.dp.size)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.heartbeat = Heartbeat(self.run_dir / "heartbeat", rank, self.world_size, cfg.run.hang_timeout_s)
        """Where this rank is in its loop, for the hang watchdog (started by `fit`)."""
        bf16 = cfg.precision.name in ("bf16", "fp8")  # fp8: float8 block matmuls inside bf16 autocast; MFU vs bf16 peak
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32

    # -- one optimizer step ---------------------------------------------------------------
    def _train_step(self, step: int) -> dict:
        t = self.cfg.trainer
        lr = set_lr(self.engine.lr_groups(), step, t, self.lr_scales)
        self.heartbeat.beat(step, "data")
        micro = [self._to_device(self.batches.next_batch()) for _ in range(self.accum_steps)]
        self.heartbeat.beat(step, "forward_backward")
        # The objective's normalizer over the whole step on every dp rank, before any backward: each rank
        # scales its share so that data parallelism's gradient average is the gradient of the global mean.
        normalizer, tokens, labelled = self.dp.sum_ints(
            sum(self.objective.normalizer(b) for b in micro), sum(processed_tokens(b) for b in micro),
            sum(labelled_tokens(b) for b in micro),
        )
        self.engine.zero_grad()
        sums = self.engine.forward_backward(micro, self.objective, normalizer)
        names, flat = sums.flat()
        loss, metrics = _means(StepSums.unflat(names, self.dp.sum(flat)), normalizer)
        self.heartbeat.beat(step, "update")
        grad_norm, stepped = self.engine.update(t.grad_clip if t.grad_clip > 0 else math.inf, math.isfinite(loss))
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": stepped, "tokens": tokens, **metrics}
        if hasattr(self.batches, "metrics"):
            out.update(self.batches.metrics())
        if "labels" in micro[0]:  # SFT: how much of what the model reads it learns from (prompts carry no loss)
            out["loss_token_fraction"] = labelled / max(tokens, 1)
        return out

    def _step_flops(self, tokens: int, loss_fraction: float | None) -> float:
        """Model FLOPs of a step (6 N per token + attention, `Llama.flops_per_token`), with the output head counted
        only for the tokens that carry loss when the batches say which (the fused loss never runs the head on
        the others: counting them would put an SFT run's MFU above 1)."""
        flops = self.flops_per_token * tokens
        if loss_fraction is not None:
            m = self.cfg.model
            flops -= 6 * m.vocab_size * m.dim * tokens * (1 - loss_fraction)
        return flops

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @property
    def world_size(self) -> int:
        """Processes in the run (1 without torch.distributed); MFU compares against all their peaks."""
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def _say(self, message: str) -> None:
        """Print on rank 0 only, so a run with N processes prints each line once."""
        if self.main:
            print(message, flush=True)

    def evaluate(self) -> dict[str, float]:
        """{'eval_loss': mean over the held-out batches' units, 'eval_<metric>': ...}; empty without them."""
        if not self.eval_set and not self.evaluators:
            return {}
        self.model.eval()
        record: dict[str, float] = {}
        if self.eval_set:
            total, count = StepSums(), 0
            for batch in self.eval_set:
                batch = self._to_device(batch)
                sums = self.engine.forward(batch, self.objective)
                total.add(sums.loss, {name: tuple(pair) for name, pair in sums.metrics.items()})
                count += self.objective.normalizer(batch)
            loss, metrics = _means(total, count)
            record = {"eval_loss": loss, **{f"eval_{name}": value for name, value in metrics.items()}}
        for evaluator in self.evaluators:
            record.update({f"eval_{name}": value for name, value in evaluator(self.model).items()})
        self.model.train()
        return record

    def _non_finite(self, step: int, streak: int, progress: ConsoleProgress) -> None:
        """Warn about a skipped step; abort after trainer.max_bad_steps of them in a row."""
        progress.write(f"warning: step {step} skipped: non-finite loss or gradient ({streak} in a row)")
        if streak >= self.cfg.trainer.max_bad_steps:
            raise TrainingAborted(
                f"aborted at step {step}: {streak} steps in a row had a non-finite loss or gradient "
                f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); lower trainer.lr or check the data"
            )

    def _record(self, step: int, out: dict, elapsed: float, peak: float | None) -> dict:
        """What step `step` logs: its outputs, speed, MFU and, when due, the eval."""
        t = self.cfg.trainer
        tokens = out.pop("tokens")
        record = {"step": step, **out, "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                  "tokens_seen": step * tokens}
        if peak:
            record["mfu"] = self._step_flops(tokens, record.get("loss_token_fraction")) / elapsed / peak
        if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
            self.heartbeat.beat(step, "eval")
            record.update(self.evaluate())
        return record

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_yaml = to_yaml(cfg)
        if self.main:
            (self.run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
        manager = CheckpointManager(self.run_dir, t.keep_last, warn=lambda m: self._say(f"warning: {m}"))
        meta = manager.resume(self.components)
        step = 0
        run_id = new_run_id()
        if meta is not None:
            step = meta["step"]
            run_id = meta.get("wandb_run_id") or run_id
            self.batches.load_state_dict(meta["rank"]["data"])
            if self.main:
                truncate_after(self.run_dir / "metrics.jsonl", step)
            self._say(f"resumed from {manager.dir / step_dir_name(step)} (step {step})")
        jsonl = JsonlLogger(self.run_dir / "metrics.jsonl") if self.main else None
        wandb_cfg = cfg.logger.wandb if self.main else dataclasses.replace(cfg.logger.wandb, mode="disabled")
        wandb_run = WandbLogger(wandb_cfg, self.run_dir, run_id, to_dict(cfg))
        peak = peak_flops(self.device, self.compute_dtype) * self.world_size if self.flops_per_token else None
        progress = ConsoleProgress(t.max_steps, step, enabled=cfg.logger.progress_bar, silent=not self.main)
        bad_streak, last_loss, eval_loss, saved, stopped, started_from = 0, math.nan, None, None, None, step
        if self.engine.after_optimizer_step is not None:  # e.g. float8 weight scales: the first step needs them too
            self.engine.after_optimizer_step()
        self.model.train()
        try:
            with StopRequests(self.device) as stop, self.heartbeat:  # stop: SIGTERM / SIGUSR1 / the stop file
                while step < t.max_steps:
                    start = time.perf_counter()
                    out = self._train_step(step)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    elapsed = time.perf_counter() - start
                    step += 1
                    bad_streak = 0 if out.pop("finite") else bad_streak + 1
                    if bad_streak:
                        self._non_finite(step, bad_streak, progress)
                    last_loss = out["loss"]
                    record = self._record(step, out, elapsed, peak)
                    eval_loss = record.get("eval_loss", eval_loss)
                    if jsonl and t.log_every and (step % t.log_every == 0 or step == t.max_steps
                                                  or "eval_loss" in record):
                        jsonl.log(record)
                        wandb_run.log(record)
                    progress.update(record)
                    self.heartbeat.beat(step, "stop_check")
                    stopped = stop.requested() if step < t.max_steps else None
                    if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.max_steps or stopped:
                        self.heartbeat.beat(step, "checkpoint")
                        extra = {"wandb_run_id": run_id, "lineage": self.lineage}
                        saved = manager.save(step, self.components, extra, config_yaml,
                                             rank_state={"data": self.batches.state_dict()})
                    if stopped:
                        progress.write(f"stopped after step {step} on {stopped}: checkpoint {saved}; the same "
                                       f"command resumes from it")
                        break
                stop.report("stopped" if stopped else "finished", step, started_from, saved)
        finally:
            progress.close()
            if jsonl:
                jsonl.close()
            wandb_run.close()
        return TrainResult(step, meta["step"] if meta else None, last_loss, eval_loss, saved, stopped)
