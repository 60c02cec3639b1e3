"""bf16 vs fp8 training throughput and MFU of a ~1B Llama on one GPU (the H100 goal of the parallelism issue).

    python tools/bench_gpu.py                 # bf16 and fp8 (tensorwise, rowwise), seq 4096, compiled blocks
    python tools/bench_gpu.py --steps 20 --micro-batch 2

Same script, same model, same random batches for every variant; prints one markdown row per variant
(tokens/s, step time, MFU against the GPU's dense bf16 peak, as torchtitan reports fp8 MFU) and the fp8 /
bf16 speed-up. Needs a CUDA GPU (fp8: compute capability >= 8.9); on CPU it exits with a message.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.metrics.mfu import gpu_peak_flops
from llmhpc.models import build_model
from llmhpc.train.objective import causal_lm_loss

MODEL_1B = ModelConfig(
    name="llama_1b", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
    max_seq_len=4096, rope_theta=500000.0, tie_embeddings=False,
)
"""Llama-3.2-1B's shape, untied (1.5 B parameters with both embedding matrices)."""


def run_variant(precision: str, steps: int, micro_batch: int, seq: int, compile_blocks: bool) -> dict:
    """Train `steps` steps after 3 warm-up steps; returns tokens/s, step time and MFU."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(MODEL_1B, device=device)
    if precision.startswith("fp8"):
        from llmhpc.parallel.float8 import apply_float8

        apply_float8(model, precision.split("_", 1)[1], fsdp=False)
    if compile_blocks:
        for block in model.layers.values():
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, MODEL_1B.vocab_size, (micro_batch, seq + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n = causal_lm_loss(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss_sum) / n

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    tokens_per_s = micro_batch * seq / elapsed
    peak = gpu_peak_flops(torch.cuda.get_device_name(device), torch.bfloat16)
    mfu = model.flops_per_token(seq) * tokens_per_s / peak if peak else float("nan")
    memory = torch.cuda.max_memory_allocated() / 2**30
    return {"precision": precision, "tokens_per_s": tokens_per_s, "step_s": elapsed, "mfu": mfu, "loss": loss,
            "peak_gib": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--variants", default="bf16,fp8_tensorwise,fp8_rowwise")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: needs a CUDA GPU (this machine has none); see docs/benchmarks.md for measured figures")
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}, seq {args.seq}, micro-batch {args.micro_batch}, "
          f"compile {not args.no_compile}")
    print("| precision | tokens/s | step (s) | MFU (vs bf16 peak) | peak mem (GiB) | loss |")
    print("|---|---|---|---|---|---|")
    results = []
    for variant in args.variants.split(","):
        r = run_variant(variant, args.steps, args.micro_batch, args.seq, not args.no_compile)
        results.append(r)
        torch.cuda.empty_cache()  # the variant's model and optimizer are gone with its frame
        print(f"| {variant} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | "
              f"{r['loss']:.3f} |", flush=True)
    base = next((r for r in results if r["precision"] == "bf16"), None)
    for r in results:
        if base and r is not base:
            print(f"{r['precision']} / bf16 tokens/s: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
