"""`python tests/peak_rss.py ARGS`: run `llmhpc ARGS`, then write this process's peak resident memory.

The peak (VmHWM, KiB) goes to $PEAK_RSS_DIR/rank<RANK>, one file per rank under torchrun. VmHWM and not
ru_maxrss: Linux carries ru_maxrss across exec, so a run started by a large pytest process would report
pytest's own size.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmhpc.cli import main


def peak_rss_kib() -> int:
    """High-water mark of this process's resident memory, in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    out = Path(os.environ["PEAK_RSS_DIR"]) / f"rank{os.environ.get('RANK', '0')}"
    out.write_text(str(peak_rss_kib()))
    sys.exit(rc)
