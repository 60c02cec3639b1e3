"""The hang watchdog: the thread's records, when it fires (and when not), and the report that names the culprit.

Timing tests use 0.05 s intervals and poll with generous deadlines, so a slow machine makes them slower,
not flaky. The report tests use hand-written records at fixed times, so they do not depend on timing at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from llmhpc.train.heartbeat import HANG_EXIT_CODE, Heartbeat, hang_report

INTERVAL = 0.05
NOW = 1_000_000.0


def wait_for(cond: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(
    directory: Path, rank: int, step: int, phase: str, host: str, written_ago: float = 1.0, progress_ago: float = 900.0
) -> None:
    record = {
        "rank": rank,
        "host": host,
        "pid": 1000 + rank,
        "step": step,
        "phase": phase,
        "progress_at": NOW - progress_ago,
        "written_at": NOW - written_ago,
    }
    (directory / f"rank{rank:05d}.json").write_text(json.dumps(record))


def test_exit_code_is_timeouts() -> None:
    assert HANG_EXIT_CODE == 124


def test_thread_writes_the_last_beat(tmp_path: Path) -> None:
    path = tmp_path / "hb" / "rank00003.json"
    with Heartbeat(tmp_path / "hb", rank=3, world_size=4, timeout_s=60, interval_s=INTERVAL, on_hang=[].append) as hb:
        assert path.exists()  # start() writes the first record itself
        hb.beat(7, "forward_backward")
        assert wait_for(lambda: (read_record(path) or {}).get("phase") == "forward_backward")
        hb.beat(8, "update")
        assert wait_for(lambda: (read_record(path) or {}).get("step") == 8)
    rec = read_record(path)
    assert rec is not None
    assert rec["rank"] == 3 and rec["phase"] == "update" and rec["host"] and rec["pid"] > 0
    assert rec["written_at"] >= rec["progress_at"]
    assert [p.name for p in path.parent.iterdir()] == ["rank00003.json"]  # no temporary file left behind


def test_on_hang_fires_once_after_timeout(tmp_path: Path) -> None:
    calls: list[str] = []
    hb = Heartbeat(tmp_path, rank=1, world_size=2, timeout_s=0.2, interval_s=INTERVAL, on_hang=calls.append).start()
    try:
        hb.beat(41, "update")
        assert wait_for(lambda: calls)
        assert hb._thread is not None and wait_for(lambda: not hb._thread.is_alive())  # the thread ends after it
        time.sleep(5 * INTERVAL)
        assert len(calls) == 1
        assert "rank 1" in calls[0] and "step 41" in calls[0] and "phase update" in calls[0]
        assert "rank 0 never wrote a heartbeat" in calls[0]
    finally:
        hb.stop()


def test_on_hang_not_called_while_beats_come(tmp_path: Path) -> None:
    calls: list[str] = []
    with Heartbeat(tmp_path, rank=0, world_size=1, timeout_s=0.5, interval_s=INTERVAL, on_hang=calls.append) as hb:
        end = time.monotonic() + 1.5  # three timeouts long, beating every 0.05 s
        step = 0
        while time.monotonic() < end:
            hb.beat(step, "forward_backward")
            step += 1
            time.sleep(INTERVAL)
        assert calls == []
    assert calls == []


def test_stop_is_prompt_and_final(tmp_path: Path) -> None:
    hb = Heartbeat(tmp_path, rank=0, world_size=1, timeout_s=60, interval_s=10.0, on_hang=[].append).start()
    path = tmp_path / "rank00000.json"
    t0 = time.monotonic()
    hb.stop()
    assert time.monotonic() - t0 < 1.0  # woken by the event, not after a 10 s sleep
    assert hb._thread is not None and not hb._thread.is_alive()

    hb = Heartbeat(tmp_path, rank=0, world_size=1, timeout_s=60, interval_s=INTERVAL, on_hang=[].append).start()
    hb.stop()
    written = path.stat().st_mtime_ns
    time.sleep(5 * INTERVAL)
    assert path.stat().st_mtime_ns == written


def test_disabled_writes_nothing(tmp_path: Path) -> None:
    calls: list[str] = []
    with Heartbeat(tmp_path / "hb", rank=0, world_size=1, timeout_s=0, on_hang=calls.append) as hb:
        hb.beat(1, "data")
        time.sleep(0.1)
    assert not (tmp_path / "hb").exists() and calls == []


def test_report_names_a_stale_rank_with_host_and_age(tmp_path: Path) -> None:
    for r in (0, 1, 3):
        write_record(tmp_path, r, 41, "update", f"node0{r}")
    write_record(tmp_path, 2, 41, "data", "node07", written_ago=640.0)
    report = hang_report(tmp_path, 4, now=NOW, stale_after_s=90)
    assert "rank 2 stopped writing heartbeats 640 s ago (host node07, step 41, phase data)" in report
    assert "the other 3 ranks (0-1,3) are at step 41, phase update" in report
    assert "docs/slurm.md#hangs" in report and "\n" not in report


def test_report_names_a_rank_in_another_phase(tmp_path: Path) -> None:
    for r in (0, 2, 3):
        write_record(tmp_path, r, 41, "forward_backward", f"node0{r}")
    write_record(tmp_path, 1, 41, "data", "node05", progress_ago=912.0)
    report = hang_report(tmp_path, 4, now=NOW, stale_after_s=90)
    assert "rank 1 has been at step 41, phase data for 912 s (host node05)" in report
    assert "the other 3 ranks (0,2-3) are at step 41, phase forward_backward" in report
    assert "rank 0 " not in report and "rank 2 " not in report


def test_report_names_missing_and_partial_ranks(tmp_path: Path) -> None:
    write_record(tmp_path, 0, 5, "update", "node00")
    write_record(tmp_path, 1, 5, "update", "node01")
    (tmp_path / "rank00002.json").write_text('{"rank": 2, "host": "no')  # partial write counts as missing
    report = hang_report(tmp_path, 4, now=NOW, stale_after_s=90)
    assert "ranks 2-3 never wrote a heartbeat" in report
    assert "the other 2 ranks (0-1) are at step 5, phase update" in report


def test_report_when_no_rank_stands_out(tmp_path: Path) -> None:
    for r in range(4):
        write_record(tmp_path, r, 12, "forward_backward", f"node0{r}")
    report = hang_report(tmp_path, 4, now=NOW, stale_after_s=90)
    assert report.startswith("all 4 ranks are at step 12, phase forward_backward")
    assert "never wrote" not in report and "stopped writing" not in report


def test_report_caps_the_list(tmp_path: Path) -> None:
    for r in range(20):
        write_record(tmp_path, r, 3, "update", "n", written_ago=500.0 if r < 12 else 1.0)
    report = hang_report(tmp_path, 20, now=NOW, stale_after_s=90)
    assert report.count("stopped writing") == 8 and "and 4 more" in report
    assert "the other 8 ranks (12-19) are at step 3, phase update" in report
