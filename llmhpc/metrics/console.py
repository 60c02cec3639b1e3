"""Live progress bar on the console (tqdm), with the latest loss, the objective's metrics, lr and throughput."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_NOT_SHOWN = ("step", "grad_norm", "step_time_s", "tokens_seen")
"""Record fields the bar leaves to metrics.jsonl / W&B; the loss, eval loss, the objective's own metrics, lr,
tokens/s and MFU are shown."""


class ConsoleProgress:
    """A progress bar over optimizer steps; `enabled=False` prints one line per log instead.

    `silent=True` (every rank but 0 of a multi-process run) prints nothing at all, so the loop can
    report the same way on every rank.
    """

    def __init__(self, total: int, initial: int, enabled: bool = True, desc: str = "train", silent: bool = False):
        self.enabled = enabled and not silent
        self.silent = silent
        self._bar = (
            tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
            if self.enabled
            else None
        )

    def update(self, record: dict, advance: int = 1) -> None:
        if self.silent:
            return
        shown = {k: v for k, v in record.items() if k not in _NOT_SHOWN}
        text = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()}
        if self._bar is not None:
            self._bar.set_postfix(text, refresh=False)
            self._bar.update(advance)
        else:
            print(f"step {record.get('step')}: " + " ".join(f"{k}={v}" for k, v in text.items()), file=sys.stderr)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self.silent:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
