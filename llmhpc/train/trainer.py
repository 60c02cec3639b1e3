"""The one training loop every stage uses.

A stage hands the trainer a model, an optimizer, a batch source with a resumable position and
a loss function; the trainer owns everything else: learning-rate schedule, gradient
accumulation, clipping, autocast, the non-finite guard, eval, logging and checkpoints. The
same loop therefore serves pretraining, SFT, LoRA and the RL stages.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from llmhpc.checkpoint import CheckpointManager
from llmhpc.checkpoint.manager import step_dir_name
from llmhpc.config.load import to_dict, to_yaml
from llmhpc.config.schema import Config
from llmhpc.metrics.console import ConsoleProgress
from llmhpc.metrics.jsonl import JsonlLogger, truncate_after
from llmhpc.metrics.mfu import peak_flops
from llmhpc.metrics.wandb_logger import WandbLogger, new_run_id
from llmhpc.parallel.process_group import is_main_process
from llmhpc.train.losses import IGNORE_INDEX, causal_lm_loss
from llmhpc.train.reduce import DataParallelReducer
from llmhpc.train.schedule import set_lr

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from torch.distributed.device_mesh import DeviceMesh

    from llmhpc.parallel.pipeline import PipelineRunner

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


class BatchSource(Protocol):
    """Where training batches come from; its position is saved in every checkpoint."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite steps); the message says why."""


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


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is available; use run.device=cpu or auto")
    return torch.device(name)


class Trainer:
    """Runs `cfg.trainer.max_steps` optimizer steps, resuming from the newest checkpoint."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: BatchSource,
        *,
        loss_fn: LossFn = causal_lm_loss,
        eval_batches: list[Batch] | None = None,
        flops_per_token: float | None = None,
        lineage: dict | None = None,
        dp_mesh: DeviceMesh | None = None,
        pipeline: PipelineRunner | None = None,
        after_optimizer_step: Callable[[], None] | None = None,
        deepspeed: DeepSpeedEngine | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.loss_fn = loss_fn
        self.eval_set = eval_batches or []
        self.flops_per_token = flops_per_token
        self.lineage = lineage or {}
        self.device = next(model.parameters()).device
        self.run_dir = Path(cfg.run.dir)
        self.dp = DataParallelReducer(dp_mesh, self.device)
        self.pipeline = pipeline
        """Under pipeline parallel, runs each step's micro-batches through this rank's stages."""
        self.after_optimizer_step = after_optimizer_step
        """Called after every applied optimizer step (e.g. float8 weight scales for FSDP's fp8 all-gather)."""
        self.deepspeed = deepspeed
        """With parallel.engine=deepspeed: the engine wrapping `model`; losses run through it, and it
        reduces gradients, clips and steps. `loss_fn` then receives the engine as its model."""
        self.main = is_main_process()
        self.accum_steps = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * self.dp.size)
        self.loss_context = nullcontext
        """Context for the loss and its backward: `loss_parallel()` when the logits stay vocabulary-sharded."""
        if cfg.parallel.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            self.loss_context = loss_parallel
        bf16 = cfg.precision.name in ("bf16", "fp8")  # fp8: float8 block matmuls inside bf16 autocast; MFU vs bf16 peak
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else (lambda: nullcontext())
        )

    # -- one optimizer step ---------------------------------------------------------------
    def _train_step(self, step: int) -> dict:
        t = self.cfg.trainer
        lr = set_lr(self.optimizer, step, t)
        micro = [self._to_device(self.batches.next_batch()) for _ in range(self.accum_steps)]
        # Every rank divides by the global token count; data parallelism averages gradients over the
        # dp ranks, so each rank scales its share by dp size to make the result the global mean.
        n_tokens = self.dp.sum_int(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro))
        input_tokens = sum(b["input_ids"].numel() for b in micro) * self.dp.size
        if self.deepspeed is not None:
            return {"lr": lr, "tokens": input_tokens, **self._deepspeed_step(lr, micro, n_tokens)}
        self.optimizer.zero_grad(set_to_none=True)
        if self.pipeline is not None:
            with self.autocast():
                total_loss = self.pipeline.train_step(micro, self.dp.size / max(n_tokens, 1))
        else:
            total_loss = torch.zeros((), device=self.device)
            for batch in micro:
                with self.loss_context():  # loss parallel: the backward must run inside it too
                    with self.autocast():
                        loss_sum, _ = self.loss_fn(self.model, batch)
                    (loss_sum / max(n_tokens, 1) * self.dp.size).backward()  # "* 1": one process stays bitwise
                total_loss += self.dp.full(loss_sum.detach())
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        if self.pipeline is not None:  # each rank holds some stages: the norm is global over the pipeline too
            grad_norm = float(self.pipeline.clip_grad_norm(params, max_norm))
        else:
            grad_norm = float(self.dp.full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        loss = (self.dp.sum(total_loss) / max(n_tokens, 1)).item()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)  # global values: every rank decides alike
        if finite:
            self.optimizer.step()
            if self.after_optimizer_step is not None:
                self.after_optimizer_step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": finite, "tokens": input_tokens}

    def _deepspeed_step(self, lr: float, micro: list[Batch], n_tokens: int) -> dict:
        """The same step through a DeepSpeed engine, which reduces, clips and applies the update itself.

        DeepSpeed skips the update when the gradient norm is not finite, as the guard above does.
        """
        from llmhpc.parallel import deepspeed as ds

        engine = self.deepspeed
        ds.set_lr(engine, lr)
        total_loss = torch.zeros((), device=self.device)
        for batch in micro:
            with self.autocast():
                loss_sum, _ = self.loss_fn(engine, batch)
            ds.backward(engine, loss_sum / max(n_tokens, 1) * self.dp.size)
            total_loss += loss_sum.detach()
        grad_norm = ds.step(engine)
        loss = (self.dp.sum(total_loss) / max(n_tokens, 1)).item()
        return {"loss": loss, "grad_norm": grad_norm, "finite": math.isfinite(loss) and math.isfinite(grad_norm)}

    def _state_converters(self) -> dict:
        """How checkpoints read and write the model and optimizer: torch's default, or DeepSpeed's partitions."""
        if self.deepspeed is None:
            return {}
        from llmhpc.parallel import deepspeed as ds

        engine = self.deepspeed
        return {
            "get_states": lambda model, optimizer: ds.engine_state_dicts(engine, model),
            "set_states": lambda model, optimizer, msd, osd: ds.load_engine_state_dicts(engine, model, msd, osd),
        }

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

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean per-token loss over the held-out batches."""
        if not self.eval_set:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.eval_set:
            batch = self._to_device(batch)
            with self.autocast():
                if self.pipeline is not None:
                    loss_sum, n = self.pipeline.eval_loss_sum(batch), int((batch["labels"] != IGNORE_INDEX).sum())
                else:
                    with self.loss_context():
                        loss_sum, n = self.loss_fn(self.model if self.deepspeed is None else self.deepspeed, batch)
            total += float(self.dp.full(loss_sum))
            count += n
        self.model.train()
        return total / max(count, 1)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_yaml = to_yaml(cfg)
        if self.main:
            (self.run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
        manager = CheckpointManager(self.run_dir, t.keep_last, warn=lambda m: self._say(f"warning: {m}"),
                                    **self._state_converters())
        meta = manager.resume(self.model, self.optimizer)
        step = 0
        run_id = new_run_id()
        if meta is not None:
            step = meta["step"]
            run_id = meta.get("wandb_run_id") or run_id
            self.batches.load_state_dict(meta["data"])
            if self.main:
                truncate_after(self.run_dir / "metrics.jsonl", step)
            self._say(f"resumed from {manager.dir / step_dir_name(step)} (step {step})")
        jsonl = JsonlLogger(self.run_dir / "metrics.jsonl") if self.main else None
        wandb_cfg = cfg.logger.wandb if self.main else dataclasses.replace(cfg.logger.wandb, mode="disabled")
        wandb_run = WandbLogger(wandb_cfg, self.run_dir, run_id, to_dict(cfg))
        peak = peak_flops(self.device, self.compute_dtype) * self.world_size if self.flops_per_token else None
        progress = ConsoleProgress(t.max_steps, step, enabled=cfg.logger.progress_bar, silent=not self.main)
        bad_streak, last_loss, eval_loss, saved = 0, math.nan, None, None
        if self.after_optimizer_step is not None:  # e.g. float8 weight scales: the first step needs them too
            self.after_optimizer_step()
        self.model.train()
        try:
            while step < t.max_steps:
                start = time.perf_counter()
                out = self._train_step(step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                step += 1
                if out["finite"]:
                    bad_streak = 0
                else:
                    bad_streak += 1
                    progress.write(f"warning: step {step} skipped: non-finite loss or gradient ({bad_streak} in a row)")
                    if bad_streak >= t.max_bad_steps:
                        raise TrainingAborted(
                            f"aborted at step {step}: {bad_streak} steps in a row had a non-finite loss or gradient "
                            f"(trainer.max_bad_steps={t.max_bad_steps}); lower trainer.lr or check the data"
                        )
                last_loss = out["loss"]
                record = {
                    "step": step,
                    "loss": out["loss"],
                    "lr": out["lr"],
                    "grad_norm": out["grad_norm"],
                    "tokens_per_s": out["tokens"] / elapsed,
                    "step_time_s": elapsed,
                    "tokens_seen": step * out["tokens"],
                }
                if peak:
                    record["mfu"] = self.flops_per_token * record["tokens_per_s"] / peak
                if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        record["eval_loss"] = eval_loss
                if jsonl and t.log_every and (step % t.log_every == 0 or step == t.max_steps or "eval_loss" in record):
                    jsonl.log(record)
                    wandb_run.log(record)
                progress.update(record)
                if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.max_steps:
                    extra = {"data": self.batches.state_dict(), "wandb_run_id": run_id, "lineage": self.lineage}
                    saved = manager.save(step, self.model, self.optimizer, extra, config_yaml)
        finally:
            progress.close()
            if jsonl:
                jsonl.close()
            wandb_run.close()
        return TrainResult(step, meta["step"] if meta else None, last_loss, eval_loss, saved)
