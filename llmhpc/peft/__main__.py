"""`python -m llmhpc.peft merge base=... adapter=... dst=...` (see `llmhpc.peft.merge`)."""

import sys

from llmhpc.peft.merge import main

sys.exit(main())
