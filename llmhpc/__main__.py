"""`python -m llmhpc` (and `torchrun -m llmhpc`) runs the same CLI as the `llmhpc` script."""

import sys

from llmhpc.cli import main

sys.exit(main())
