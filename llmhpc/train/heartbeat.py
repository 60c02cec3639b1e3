"""Hang watchdog: each rank says where it is, and a stuck job names the rank that stopped and then exits.

A hung collective stops every rank at once, so a watchdog that only knows its own rank can say "no progress",
not why. Each rank therefore writes a small record (step, phase, host, time of last progress) to
`<directory>/rank{rank:05d}.json` on the shared run directory; when a rank's watchdog fires, it reads every
rank's record and names the culprit: a rank whose file stopped being written (its process or node is gone),
a rank that never wrote one, or a rank at another step/phase than most (stuck in its data loader, say).

The watchdog is a daemon thread because the main thread is the one that is stuck (inside a collective or
I/O), so nothing on it can run. `beat` is called by the trainer at each phase change and only stores a
tuple (one attribute assignment, atomic under the GIL: no lock, no I/O); the thread does the writing.
Records are written to a temporary file and `os.replace`d, so a reader never sees half a record.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HANG_EXIT_CODE: int = 124
"""Exit status of a hung run: the code `timeout(1)` uses, so scripts and people read it as "ran out of time"."""

HINT = "see docs/slurm.md#hangs; raise run.hang_timeout_s if a step can legitimately take longer"
MAX_LISTED = 8  # suspects named one by one; on thousands of ranks the rest are counted, not listed


def _ranks(ranks: list[int], limit: int = MAX_LISTED) -> str:
    """Sorted ranks as ranges ("0-2,4"), at most `limit` ranges, so the line stays short at any scale."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:limit])
    return text + (f",... ({len(ranks)} ranks)" if len(spans) > limit else "")


def _read(path: Path) -> dict | None:
    """A rank's record, or None when missing, unreadable or malformed (a partial record counts as missing)."""
    try:
        rec = json.loads(path.read_text())
        rec["step"], rec["phase"], rec["host"] = int(rec["step"]), str(rec["phase"]), str(rec["host"])
        rec["progress_at"], rec["written_at"] = float(rec["progress_at"]), float(rec["written_at"])
        return rec
    except (OSError, ValueError, TypeError, KeyError):
        return None


def hang_report(directory: Path, world_size: int, now: float, stale_after_s: float) -> str:
    """One line naming the ranks that stand out, from the records in `directory`, ending with what to do.

    Suspects: ranks whose record is older than `stale_after_s` (gone), ranks at another (step, phase) than
    the most common one among the live ranks (behind or elsewhere), and ranks with no record at all.
    """
    records = {r: _read(Path(directory) / f"rank{r:05d}.json") for r in range(world_size)}
    missing = [r for r, rec in records.items() if rec is None]
    stale = {r: rec for r, rec in records.items() if rec and now - rec["written_at"] > stale_after_s}
    live = {r: rec for r, rec in records.items() if rec and r not in stale}
    counts = Counter((rec["step"], rec["phase"]) for rec in live.values())
    # On a tie, the furthest step is taken as the common one: the ranks behind are the likelier culprits.
    common = max(counts, key=lambda k: (counts[k], k[0])) if counts else None
    elsewhere = {r: rec for r, rec in live.items() if (rec["step"], rec["phase"]) != common}

    named = [
        f"rank {r} stopped writing heartbeats {now - rec['written_at']:.0f} s ago "
        f"(host {rec['host']}, step {rec['step']}, phase {rec['phase']})"
        for r, rec in sorted(stale.items())
    ] + [
        f"rank {r} has been at step {rec['step']}, phase {rec['phase']} for {now - rec['progress_at']:.0f} s "
        f"(host {rec['host']})"
        for r, rec in sorted(elsewhere.items())
    ]
    parts = named[:MAX_LISTED] + ([f"and {len(named) - MAX_LISTED} more"] if len(named) > MAX_LISTED else [])
    if missing:
        parts.append(f"rank{'s' if len(missing) > 1 else ''} {_ranks(missing)} never wrote a heartbeat")
    rest = [r for r in live if r not in elsewhere]
    if common is None:
        parts.append("no rank is still writing heartbeats")
    elif not parts:
        parts.append(
            f"all {world_size} ranks are at step {common[0]}, phase {common[1]} and alive, none stands out "
            "(a hang inside a collective or the shared filesystem)"
        )
    else:
        are = f"ranks ({_ranks(rest)}) are" if len(rest) > 1 else f"rank ({rest[0]}) is"
        parts.append(f"the other {len(rest)} {are} at step {common[0]}, phase {common[1]}")
    return "; ".join(parts) + f" -- {HINT}"


def _exit_on_hang(message: str) -> None:
    """Print and end the process at once: the main thread is stuck, so no exception or atexit would run."""
    print(f"llmhpc: {message}", file=sys.stderr, flush=True)
    os._exit(HANG_EXIT_CODE)


class Heartbeat:
    """This rank's progress record and the watchdog thread that writes it and fires after `timeout_s` idle."""

    def __init__(
        self,
        directory: Path,
        rank: int,
        world_size: int,
        timeout_s: float,
        interval_s: float | None = None,
        on_hang: Callable[[str], None] | None = None,
    ) -> None:
        self.directory, self.rank, self.world_size, self.timeout_s = Path(directory), rank, world_size, timeout_s
        # Several writes per timeout, so a live rank's record is never mistaken for stale (3 intervals).
        self.interval_s = max(0.05, interval_s if interval_s is not None else min(30.0, timeout_s / 4))
        self.on_hang = on_hang or _exit_on_hang
        self.enabled = timeout_s > 0
        self._last = (0, "start", time.monotonic(), time.time())  # step, phase, monotonic, wall clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host, self._path = socket.gethostname(), self.directory / f"rank{rank:05d}.json"

    def start(self) -> Heartbeat:
        """Write the first record (so a rank that hangs before any beat is not reported as missing), then watch."""
        if not self.enabled or self._thread is not None:
            return self
        step, phase, _, _ = self._last
        self._last = (step, phase, time.monotonic(), time.time())  # the clock starts now, not at construction
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name=f"llmhpc-heartbeat-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int, phase: str) -> None:
        """Record progress: called at every phase change on the training thread, so it does no I/O and takes no lock."""
        if self.enabled:
            self._last = (step, phase, time.monotonic(), time.time())

    def stop(self) -> None:
        """End the watchdog now: it waits on an Event, not a sleep, so stopping does not take up to an interval."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)  # a write stuck on a hung filesystem must not hang the caller too

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write(self) -> None:
        step, phase, _, wall = self._last
        record = {
            "rank": self.rank,
            "host": self._host,
            "pid": os.getpid(),
            "step": step,
            "phase": phase,
            "progress_at": wall,
            "written_at": time.time(),
        }
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._path)
        except OSError as e:  # a filesystem hiccup must not kill the watchdog; the timeout check still runs
            print(f"llmhpc: heartbeat of rank {self.rank} not written: {e}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()
            step, phase, mono, _ = self._last
            idle = time.monotonic() - mono
            if idle > self.timeout_s:
                try:
                    report = hang_report(self.directory, self.world_size, time.time(), 3 * self.interval_s)
                except Exception as e:  # the job must still end with a message
                    report = f"the other ranks' heartbeats could not be read ({e!r}) -- {HINT}"
                self.on_hang(
                    f"no training progress on rank {self.rank} for {idle:.0f} s (step {step}, phase {phase}): {report}"
                )
                return
