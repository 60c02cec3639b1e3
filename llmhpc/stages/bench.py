"""`llmhpc bench`: our train-step throughput against transformers' LlamaForCausalLM, in one run.

Three trainers start from the same weights and take the same batches: ours (compiled when
`parallel.compile=true`, with the fused LM-head loss of `causal_lm_loss`; its defaults are
`llmhpc.stages.registry.BENCH_DEFAULTS`), transformers eager and
transformers under `torch.compile`. A step is forward + backward + fused AdamW step with the same
hyperparameters, so the ratio measures the model and loss implementations. Steps are interleaved
(one step of each, in a rotating order, per round) because CPU timings on shared machines drift
over minutes; medians are reported with their spread. The per-step losses of all three are
compared, so a speedup that changed the numbers does not go unnoticed.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from llmhpc.config import ConfigError
from llmhpc.config.schema import Config
from llmhpc.metrics.bench_table import REFERENCES, table_row, update_table
from llmhpc.metrics.import_noise import quiet_import_noise
from llmhpc.metrics.kernel_floor import FloorTimes, KernelFloor
from llmhpc.metrics.mfu import measured_gemm_flops
from llmhpc.models import build_model
from llmhpc.models.hf import config_to_hf, state_dict_to_hf
from llmhpc.train.objective import causal_lm_loss
from llmhpc.train.optim import build_optimizer

WARMUP_STEPS = 2
"""Untimed steps per implementation before timing: the first compiles, the second settles allocators."""

LOSS_TOL = {"fp32": 1e-3, "bf16": 5e-2}
"""Largest per-step loss difference (nats) accepted as 'equal loss': fp32 differs only in summation
order; bf16 autocast rounds every matmul input, and the two models round in different places."""


StepFn = Callable[[dict[str, torch.Tensor]], float]


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label() -> str:
    """Device column: CPU name and thread count (the two things that set CPU throughput)."""
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def hf_twin(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' LlamaForCausalLM (SDPA attention) holding a copy of `model`'s weights."""
    quiet_import_noise()  # transformers' model classes import torchao, whose CPU-machine notices are not ours
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**config_to_hf(model.cfg), attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg)  # a real (not meta) build, so transformers sets up its own buffers
    state = state_dict_to_hf(model.state_dict())
    missing, unexpected = hf.load_state_dict(state, strict=False)  # copies: no storage is shared
    if model.cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto transformers: missing {missing}, extra {unexpected}")
    return hf.train()


def ours_step(model, optimizer, bf16: bool) -> StepFn:
    """One train step of our model through the trainer's loss (`causal_lm_loss`)."""

    def step(batch: dict[str, torch.Tensor]) -> float:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(bf16):
            loss_sum, n_tokens = causal_lm_loss(model, batch)
        loss = loss_sum / n_tokens
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def hf_step(model, optimizer, bf16: bool) -> StepFn:
    """One train step of transformers through its own loss (labels are already shifted)."""

    def step(batch: dict[str, torch.Tensor]) -> float:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(bf16):
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"])
        out.loss.backward()
        optimizer.step()
        return float(out.loss.detach())

    return step


def _batches(cfg: Config, n: int, random_tokens: bool) -> tuple[list[dict[str, torch.Tensor]], str]:
    """n micro-batches of real Shakespeare tokens (or seeded random tokens) and a label saying which."""
    t = cfg.trainer
    if random_tokens:
        gen = torch.Generator().manual_seed(cfg.run.seed)
        out = []
        for _ in range(n):
            ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=gen)
            out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
        return out, "random tokens"
    from llmhpc.data.prepare import prepare_corpus
    from llmhpc.data.pretrain import PackedTokens, PretrainLoader

    loader = PretrainLoader(
        PackedTokens(prepare_corpus(cfg.data, seed=cfg.run.seed), "train"), t.seq_len, t.micro_batch_size,
        cfg.run.seed,
    )
    return [loader.next_batch() for _ in range(n)], f"{cfg.data.name} corpus ({cfg.data.tokenizer} tokenizer)"


def _build(cfg: Config, bf16: bool, references: tuple[str, ...]) -> tuple[dict[str, StepFn], torch.nn.Module]:
    """The step functions of ours and of each reference, and our (uncompiled) model."""
    torch.manual_seed(cfg.run.seed)
    ours = build_model(cfg.model).train()
    models = [("ours", ours, ours_step)] + [(ref, hf_twin(ours), hf_step) for ref in references]
    steps = {}
    for name, model, make in models:
        optimizer, _ = build_optimizer(model, cfg.trainer)  # same groups, lr, betas, eps; fused AdamW
        if name == "hf_compiled" or (name == "ours" and cfg.parallel.compile):
            model.compile()
        steps[name] = make(model, optimizer, bf16)
    return steps, ours


def run(
    cfg: Config,
    docs_path: Path | str | None = "docs/benchmarks.md",
    random_tokens: bool = False,
    references: tuple[str, ...] = REFERENCES,
) -> dict:
    """Run the benchmark, print progress, write bench.json to run.dir and update docs_path's table.

    references: which transformers variants to race (tests leave out the slow-to-compile one).
    """
    if cfg.precision.name not in LOSS_TOL:
        raise ConfigError(
            f"llmhpc bench races transformers on this CPU in fp32 or bf16, not precision={cfg.precision.name}; "
            "for fp8 on an H100 run python tools/bench_gpu.py"
        )
    bf16 = cfg.precision.name == "bf16"
    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    t = cfg.trainer
    n_rounds = WARMUP_STEPS + t.max_steps
    batches, data_label = _batches(cfg, n_rounds, random_tokens)
    peaks = [measured_gemm_flops.__wrapped__(peak_dtype)]
    steps, ours_model = _build(cfg, bf16, references)
    floor = KernelFloor(ours_model, t.micro_batch_size, t.seq_len, peak_dtype)
    floor.measure()  # untimed: the first calls pick kernels and touch the buffers
    floor_times: list[FloorTimes] = []
    flops_per_token = build_model(cfg.model, device="meta").flops_per_token(t.seq_len)
    tokens = t.micro_batch_size * t.seq_len
    names = list(steps)
    losses: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    print(f"bench: {cfg.model.name}, batch {t.micro_batch_size}x{t.seq_len}, {cfg.precision.name}, "
          f"{WARMUP_STEPS} warmup + {t.max_steps} timed rounds, {device_label()}, {data_label}", flush=True)
    for r, batch in enumerate(batches):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no one always runs first
        for name in order:
            start = time.perf_counter()
            losses[name].append(steps[name](batch))
            elapsed = time.perf_counter() - start
            if r >= WARMUP_STEPS:
                times[name].append(elapsed)
        if r >= WARMUP_STEPS:
            floor_times.append(floor.measure())
        phase = "warmup" if r < WARMUP_STEPS else "timed"
        timed = r >= WARMUP_STEPS
        cells = [f"{n} loss {losses[n][-1]:.4f}" + (f" {times[n][-1]:.2f}s" if timed else "") for n in names]
        cells += [f"kernel floor {floor_times[-1].total_s:.2f}s"] if timed else []
        print(f"  round {r + 1}/{n_rounds} ({phase}): " + " | ".join(cells), flush=True)
    peaks.append(measured_gemm_flops.__wrapped__(peak_dtype))
    peak = max(peaks)  # contention only ever lowers a measured peak
    result: dict = {
        "date": datetime.date.today().isoformat(), "device": device_label(), "torch": torch.__version__,
        "precision": cfg.precision.name, "model": cfg.model.name,
        "batch": f"{t.micro_batch_size}x{t.seq_len}",
        "data": data_label, "compile_ours": cfg.parallel.compile, "warmup_steps": WARMUP_STEPS,
        "timed_steps": t.max_steps, "flops_per_token": flops_per_token, "gemm_peak_flops": peak,
        "gemm_peak_samples": peaks, "losses": losses, "step_seconds": times, "impl": {},
    }
    for name in names:
        median = statistics.median(times[name]) if times[name] else float("nan")
        tps = tokens / median
        best = min(times[name]) if times[name] else float("nan")
        result["impl"][name] = {
            "tokens_per_s": tps, "median_step_s": median, "best_tokens_per_s": tokens / best,
            "spread": (max(times[name]) - min(times[name])) / median if times[name] else float("nan"),
            "flops": tps * flops_per_token, "peak_fraction": tps * flops_per_token / peak,
        }
    for ref in references:
        impl = result["impl"]
        result[f"ratio_vs_{ref}"] = impl["ours"]["tokens_per_s"] / impl[ref]["tokens_per_s"]
        # Steps of one round run back to back, so their ratio cancels slow drifts of machine load.
        paired = [r / o for o, r in zip(times["ours"], times[ref], strict=True)]
        result[f"paired_ratio_vs_{ref}"] = statistics.median(paired) if paired else float("nan")
        result[f"best_ratio_vs_{ref}"] = impl["ours"]["best_tokens_per_s"] / impl[ref]["best_tokens_per_s"]
        pairs = zip(losses["ours"], losses[ref], strict=True)
        result[f"max_loss_diff_vs_{ref}"] = max(abs(a - b) for a, b in pairs)
    if len(references) == 2:  # the spread two correct implementations show: the noise floor of "equal"
        pairs = zip(losses[references[0]], losses[references[1]], strict=True)
        result["max_loss_diff_between_references"] = max(abs(a - b) for a, b in pairs)
    totals = [f.total_s for f in floor_times]
    result["kernel_floor"] = {
        "median_step_s": statistics.median(totals) if totals else float("nan"),
        **{part: statistics.median(getattr(f, part) for f in floor_times) if floor_times else float("nan")
           for part in ("matmul_s", "attention_s", "optimizer_s")},
    }
    for name in names:  # per round, like the paired ratios: step time over that round's floor
        result["impl"][name]["over_floor"] = (
            statistics.median(a / b for a, b in zip(times[name], totals, strict=True)) if totals else float("nan"))
    result["loss_tolerance"] = LOSS_TOL[cfg.precision.name]
    result["equal_loss"] = all(result[f"max_loss_diff_vs_{r}"] <= result["loss_tolerance"]
                               for r in references)
    _report(result)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if docs_path is not None:
        update_table(Path(docs_path), table_row(result))
    return result


def _report(r: dict) -> None:
    for name, v in r["impl"].items():
        print(f"  {name:<12} {v['tokens_per_s']:8.1f} tok/s, best step {v['best_tokens_per_s']:.1f}  "
              f"(median {v['median_step_s']:.2f}s, spread "
              f"{v['spread']:.0%})  {v['flops'] / 1e9:7.1f} GFLOP/s = {v['peak_fraction']:.0%} of GEMM peak, "
              f"{v['over_floor']:.2f}x the kernel floor")
    f = r["kernel_floor"]
    print(f"  kernel floor {f['median_step_s']:.2f}s (matmuls {f['matmul_s']:.2f} + attention {f['attention_s']:.2f} "
          f"+ AdamW {f['optimizer_s']:.2f}): the most any trainer could gain is "
          + ", ".join(f"{r['impl'][x]['over_floor']:.2f}x over {x}" for x in r["impl"] if x != "ours"), flush=True)
    refs = [k.removeprefix("ratio_vs_") for k in r if k.startswith("ratio_vs_")]
    print("  " + ", ".join(f"ours / {x} {r[f'ratio_vs_{x}']:.2f}x (paired {r[f'paired_ratio_vs_{x}']:.2f}x, "
                           "max |loss diff| "
                           f"{r[f'max_loss_diff_vs_{x}']:.2e})" for x in refs)
          + f"; tolerance {r['loss_tolerance']:g}: {'equal' if r['equal_loss'] else 'NOT EQUAL'}"
          + (f" (HF compiled vs HF eager: {r['max_loss_diff_between_references']:.2e})"
             if "max_loss_diff_between_references" in r else ""), flush=True)


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc bench`: exit code 1 when the implementations' losses disagree (the speed would mean nothing)."""
    return 0 if run(cfg)["equal_loss"] else 1
