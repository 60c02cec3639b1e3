"""What is being trained, independent of how it is laid out: model shape, batch, precision."""

from __future__ import annotations

from dataclasses import dataclass

from llmhpc.config.schema import Config
from llmhpc.plan.shape import ModelShape


@dataclass(frozen=True)
class Workload:
    """One optimizer step's worth of work."""

    shape: ModelShape
    """Model sizes."""
    seq_len: int
    """Tokens per sequence."""
    global_batch: int
    """Sequences per optimizer step."""
    precision: str
    """'fp32', 'bf16' or 'fp8'."""
    split_points: tuple[int, ...] = ()
    """Manual pipeline stage boundaries (parallel.pp_split_points); empty = even."""

    @classmethod
    def of(cls, cfg: Config) -> Workload:
        return cls(ModelShape.of(cfg.model), cfg.trainer.seq_len, cfg.trainer.global_batch_size, cfg.precision.name,
                   tuple(cfg.parallel.pp_split_points))

    @property
    def low_bytes(self) -> int:
        """Bytes per element of matmul inputs and outputs: 4 in fp32, 2 under bf16 / fp8 autocast (bf16 tensors)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len
