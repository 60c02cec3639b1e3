"""The results table of `llmhpc bench` in docs/benchmarks.md: one row per device, precision, model and batch.

Kept apart from the benchmark recipe: this is formatting and file editing, the recipe is measurement.
"""

from __future__ import annotations

from pathlib import Path

TABLE_START, TABLE_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
COLUMNS = ["date", "device", "torch", "precision", "model", "batch", "ours tok/s median (best)",
           "HF eager tok/s", "HF compiled tok/s", "ours / eager", "ours / compiled", "ours GFLOP/s",
           "% GEMM peak", "GEMM peak GFLOP/s", "max Δloss vs eager / compiled (HF vs HF)",
           "kernel floor s: ours / eager over it"]
REFERENCES = ("hf_eager", "hf_compiled")
"""The transformers variants raced against ours."""
KEY_COLUMNS = ("device", "precision", "model", "batch")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _both(median: float | None, best: float | None, spec: str, suffix: str = "") -> str:
    """'median (best)': the median is the headline; the best step shows what an unloaded machine does."""
    return _fmt(median, spec, suffix) + ("" if best is None else f" ({_fmt(best, spec, suffix)})")


def _speeds(impl: dict, name: str) -> tuple[float | None, float | None]:
    entry = impl.get(name, {})
    return entry.get("tokens_per_s"), entry.get("best_tokens_per_s")


def _ratios(r: dict, ref: str) -> tuple[float | None, float | None]:
    return r.get(f"ratio_vs_{ref}"), r.get(f"best_ratio_vs_{ref}")


def table_row(r: dict) -> dict[str, str]:
    """One docs table row of a result dict."""
    impl = r["impl"]
    return {
        "date": r["date"], "device": r["device"], "torch": r["torch"], "precision": r["precision"],
        "model": r["model"], "batch": r["batch"],
        "ours tok/s median (best)": _both(*_speeds(impl, "ours"), ".0f"),
        "HF eager tok/s": _both(*_speeds(impl, "hf_eager"), ".0f"),
        "HF compiled tok/s": _both(*_speeds(impl, "hf_compiled"), ".0f"),
        "ours / eager": _both(*_ratios(r, "hf_eager"), ".2f", "×"),
        "ours / compiled": _both(*_ratios(r, "hf_compiled"), ".2f", "×"),
        "ours GFLOP/s": f"{impl['ours']['flops'] / 1e9:.0f}",
        "% GEMM peak": f"{impl['ours']['peak_fraction']:.0%}",
        "GEMM peak GFLOP/s": f"{r['gemm_peak_flops'] / 1e9:.0f}",
        "max Δloss vs eager / compiled (HF vs HF)": " / ".join(
            _fmt(r.get(f"max_loss_diff_vs_{x}"), ".1e") for x in REFERENCES
        ) + f" ({_fmt(r.get('max_loss_diff_between_references'), '.1e')})",
        "kernel floor s: ours / eager over it": _floor(r),
    }


def _floor(r: dict) -> str:
    """'3.61: 1.10× / 1.25×': the kernel floor's median and how far above it ours and HF eager ran."""
    floor = r.get("kernel_floor")
    if not floor:
        return "—"
    over = [r["impl"].get(x, {}).get("over_floor") for x in ("ours", "hf_eager")]
    return f"{floor['median_step_s']:.2f}: " + " / ".join(_fmt(v, ".2f", "×") for v in over)


def update_table(path: Path, row: dict[str, str]) -> None:
    """Insert or replace (same device, precision, model, batch) the row in path's results table."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if TABLE_START not in text:
        text = text.rstrip("\n") + f"\n\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_START, 1)
    body, tail = rest.split(TABLE_END, 1)
    rows = [dict(zip(COLUMNS, (c.strip() for c in line.strip().strip("|").split("|")), strict=False))
            for line in body.strip().splitlines()[2:] if line.strip().startswith("|")]
    key = tuple(row[k] for k in KEY_COLUMNS)
    rows = [x for x in rows if tuple(x.get(k) for k in KEY_COLUMNS) != key] + [row]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(x.get(c, "") for c in COLUMNS) + " |" for x in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + TABLE_START + "\n" + "\n".join(lines) + "\n" + TABLE_END + tail, encoding="utf-8")
