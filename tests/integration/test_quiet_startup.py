"""Entry points start without third-party noise on stderr.

With torchao installed on a CPU machine, importing a transformers model class logs torchao's
"Failed to load …_C_mxfp8….so" / "_C_cutlass_90a.abi3.so" and torch's pytree Enum deprecation notices
(see llmhpc/metrics/import_noise.py). Each case runs in a fresh process and expects an empty stderr.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

TINY = "dict(name='tiny', dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=256)"

CASES = {
    "plan": ["-m", "llmhpc", "plan", "model=tiny", "cluster=h100_8x8", "trainer.seq_len=512",
             "trainer.global_batch_size=8"],
    "pretrain_imports": ["-c", "import llmhpc.cli, llmhpc.stages.pretrain, llmhpc.data.tokenizer; print('ok')"],
    # the bench stage's imports, then what `llmhpc bench` runs before its first line: transformers'
    # LlamaForCausalLM built from our model (the import that brings in torchao)
    "bench": ["-c", "import llmhpc.cli, llmhpc.stages.bench\n"
                    "from llmhpc.config.schema import ModelConfig\n"
                    "from llmhpc.models import build_model\n"
                    "from llmhpc.stages.bench import hf_twin\n"
                    f"hf_twin(build_model(ModelConfig(**{TINY})))\n"
                    "print('ok')"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_entry_point_stderr_is_empty(case, llmhpc_cache):
    proc = subprocess.run([sys.executable, *CASES[case]], cwd=REPO, env=cli_env(llmhpc_cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("plan:" if case == "plan" else "ok"), proc.stdout[-2000:]
    assert proc.stderr == "", f"unexpected stderr from {case}:\n{proc.stderr[-4000:]}"
