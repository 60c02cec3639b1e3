"""The matrix products of one decode step, by kernel: where a rollout's time per token can go on this CPU.

    python tools/bench_decode_products.py [--rows 8] [--model smollm2_135m]

Times the products of one decode step of `--model` (a `conf/model/` name; the shapes are those of the model it
builds: every `nn.Linear`, then the output head; SmolLM2-135M: 30 layers x 7, plus the 49152-row head, 211) on
random weights, each a distinct tensor as in the model, at `--rows` rows, through:
fp32 `F.linear`; MKL's packed fp32 GEMM and oneDNN's packed fp32 inner product (weights laid out once); bf16
`F.linear` and oneDNN's packed bf16 inner product (what `llmhpc.rl.packed_weights` uses); int8 weight-only
(`_weight_int8pack_mm`, bf16 activations). Then a plain `sum` over the fp32 weights' bytes (538 MB for SmolLM2):
the memory bandwidth floor of a step that reads every fp32 weight once. Averages of 10 steps after 2 warm-up
steps, in this process; compare the lines with each other, not across machines or runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from llmhpc.config import load_config
from llmhpc.models import build_model


def product_shapes(model_name: str) -> list[tuple[int, int]]:
    """[out, in] of every weight a decode step of `model_name` multiplies by, in forward order."""
    cfg = load_config("pretrain", [f"model={model_name}"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    linears = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    return [*linears, tuple(model.lm_head_weight().shape)]


def per_step_ms(calls: list[Callable[[], torch.Tensor]], reps: int = 10) -> float:
    """Mean wall time of running every call once (one decode step's products), after 2 warm-up steps."""
    for _ in range(2):
        for call in calls:
            call()
    began = time.perf_counter()
    for _ in range(reps):
        for call in calls:
            call()
    return (time.perf_counter() - began) / reps * 1e3


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8 weights and their bf16 scales."""
    scale = weight.abs().amax(1) / 127
    return torch.round(weight / scale[:, None]).to(torch.int8), scale.bfloat16()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="rows decoding at once (default 8)")
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model/ name (default smollm2_135m)")
    args = parser.parse_args(argv)
    rows, shapes = args.rows, product_shapes(args.model)
    torch.manual_seed(0)
    fp32 = [torch.randn(n, k) * 0.02 for n, k in shapes]
    x32 = [torch.randn(rows, w.shape[1]) for w in fp32]
    x16 = [x.bfloat16() for x in x32]
    bf16 = [w.bfloat16() for w in fp32]
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in fp32]
    dnn32 = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in fp32]
    dnn16 = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in bf16]
    int8 = [int8_rows(w) for w in fp32]
    onednn = torch.ops.mkldnn._linear_pointwise
    kernels = {
        "fp32 F.linear": [partial(F.linear, x, w) for x, w in zip(x32, fp32, strict=True)],
        "fp32 MKL packed": [partial(torch.ops.mkl._mkl_linear, x, p, w, None, rows)
                            for x, p, w in zip(x32, mkl, fp32, strict=True)],
        "fp32 oneDNN packed": [partial(onednn, x, p, None, "none", [], "") for x, p in zip(x32, dnn32, strict=True)],
        "bf16 F.linear": [partial(F.linear, x, w) for x, w in zip(x16, bf16, strict=True)],
        "bf16 oneDNN packed": [partial(onednn, x, p, None, "none", [], "") for x, p in zip(x16, dnn16, strict=True)],
        "int8 weight-only (bf16 x)": [partial(torch.ops.aten._weight_int8pack_mm, x, q, scale)
                                      for x, (q, scale) in zip(x16, int8, strict=True)],
    }
    print(f"{len(shapes)} products of a {args.model} decode step at {rows} rows, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, calls in kernels.items():
        print(f"{name:28s} {per_step_ms(calls):7.2f} ms")
    flat = torch.cat([w.flatten() for w in fp32])
    print(f"{f'sum over {flat.numel() * 4 / 1e6:.0f} MB':28s} {per_step_ms([flat.sum], reps=5):7.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
