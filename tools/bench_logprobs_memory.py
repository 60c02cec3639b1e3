"""Peak memory (and time) of per-token log-probs with gradient: chunked paths against full logits.

    python tools/bench_logprobs_memory.py [--batch 8 --seq 512 --dim 576 --vocab 49152] [--json]

Each path runs forward + backward once in its own fresh Python process, on the SmolLM2-135M head shape
by default: hidden [batch, seq, dim] and weight [vocab, dim], both requiring grad, fp32.

  full     logits = hidden @ weight.T (fp32), log_softmax, gather at the targets, backward
  chunked  llmhpc.train.logprobs.token_logprobs(hidden, lambda h: F.linear(h, weight), targets)
  linear   llmhpc.train.logprobs.linear_token_logprobs(hidden, weight, targets)

A path's peak is VmHWM after the computation minus the process's baseline just before it (inputs
built, torch warmed up on a small problem, the high-water mark reset through /proc/self/clear_refs
where the kernel allows it), over the first of `--repeat` runs. Printed: each peak in MiB, peak ratios to
the full path, and the ratios of median wall and CPU time (same machine, same run; quote only ratios,
the CPU may be shared: under contention, CPU time with OMP_NUM_THREADS=1 is the steadier measure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("full", "chunked", "linear")


def _status_kib(key: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{key}:")[1].split()[0])


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); keep the old mark if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _worker(path: str, batch: int, seq: int, dim: int, vocab: int, chunk: int, repeat: int) -> dict:
    import torch
    import torch.nn.functional as F

    from llmhpc.train.logprobs import linear_token_logprobs, token_logprobs

    def full(hidden, weight, targets):
        logits = F.linear(hidden, weight).float()
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    fns = {
        "full": full,
        "chunked": lambda h, w, t: token_logprobs(h, lambda x: F.linear(x, w), t, chunk_tokens=chunk),
        "linear": lambda h, w, t: linear_token_logprobs(h, w, t, chunk_tokens=chunk),
    }
    fn = fns[path]
    gen = torch.Generator().manual_seed(0)

    def inputs(b: int, s: int):
        hidden = torch.randn(b, s, dim, generator=gen).requires_grad_()
        weight = (torch.randn(vocab, dim, generator=gen) * 0.02).requires_grad_()
        return hidden, weight, torch.randint(0, vocab, (b, s), generator=gen), torch.randn(b, s, generator=gen)

    # Warm up the code paths (lazy inits, kernels) on a tiny problem that raises no high-water mark.
    h, w, t, g = inputs(1, 4)
    (fn(h, w, t) * g).sum().backward()
    del h, w, t, g
    hidden, weight, targets, coeff = inputs(batch, seq)
    _reset_peak()
    base = _status_kib("VmHWM")
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        (fn(hidden, weight, targets) * coeff).sum().backward()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if len(walls) == 1:
            peak = _status_kib("VmHWM")  # the first run's peak: the later ones free their gradients first
        assert hidden.grad is not None and weight.grad is not None
        hidden.grad = weight.grad = None
    return {"path": path, "peak_mib": (peak - base) / 1024, "baseline_mib": base / 1024,
            "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def measure(batch: int, seq: int, dim: int, vocab: int, chunk: int, paths=PATHS, repeat: int = 1) -> dict:
    """Run every path in its own fresh process; {path: its numbers} plus the ratios to the full path."""
    out: dict = {"shape": {"batch": batch, "seq": seq, "dim": dim, "vocab": vocab, "chunk_tokens": chunk}}
    repo = Path(__file__).resolve().parent.parent
    for path in paths:
        cmd = [sys.executable, __file__, "--worker", path, "--batch", str(batch), "--seq", str(seq),
               "--dim", str(dim), "--vocab", str(vocab), "--chunk", str(chunk), "--repeat", str(repeat)]
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{path} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        out[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "full" in out:
        full = out["full"]
        for path in paths:
            if path != "full":
                out[path]["peak_ratio"] = out[path]["peak_mib"] / full["peak_mib"]
                out[path]["wall_ratio"] = out[path]["wall_s"] / full["wall_s"]
                out[path]["cpu_ratio"] = out[path]["cpu_s"] / full["cpu_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per process (median time)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.batch, args.seq, args.dim, args.vocab, args.chunk, args.repeat)))
        return 0
    result = measure(args.batch, args.seq, args.dim, args.vocab, args.chunk, tuple(args.paths.split(",")), args.repeat)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"shape {result['shape']}")
    for path in args.paths.split(","):
        r = result[path]
        ratios = "" if path == "full" else (
            f"  peak {r['peak_ratio']:.3f}x full, wall {r['wall_ratio']:.2f}x, cpu {r['cpu_ratio']:.2f}x")
        print(f"{path:8s} peak {r['peak_mib']:8.1f} MiB  wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s{ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
