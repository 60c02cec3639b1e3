"""Write the arithmetic task's train/eval JSONL splits (a thin wrapper over `python -m llmhpc.data.arithmetic`).

    python tools/make_arithmetic.py --out data/arithmetic --train 2000 --eval 500 --seed 0

The checkout this script lives in goes first on the import path, so it writes what that checkout's
generator makes even when another copy of llmhpc is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmhpc.data.arithmetic import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
