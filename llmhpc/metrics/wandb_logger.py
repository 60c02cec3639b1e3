"""Weights & Biases tracking: the resolved config at start, metrics per step, one run id per run.

The run id is created on the first start and stored in every checkpoint, so a resumed run
continues the same W&B run (`resume="allow"`) instead of starting a new one.
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path

from llmhpc.config.schema import WandbConfig


def new_run_id() -> str:
    """A fresh W&B-compatible run id (8 lowercase alphanumerics), made without importing wandb."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbLogger:
    """Thin wrapper over a `wandb` run; does nothing when mode is 'disabled'."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, run_id: str, config: dict):
        self.run = None
        if cfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or Path(run_dir).resolve().name,
            tags=list(cfg.tags),
            config=config,
            dir=str(run_dir),
            mode=cfg.mode,
            id=run_id,
            resume="allow",
        )

    def log(self, record: dict) -> None:
        if self.run is not None:
            metrics = {k: v for k, v in record.items() if k != "step"}
            self.run.log(metrics, step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
