"""Recipe: DPO — preference optimization from ranked pairs, against a frozen reference, full or with LoRA.

    llmhpc dpo model.init_from=<HF dir | .gguf | llmhpc run> [data.source=<.jsonl | .parquet | dir of pairs>]
               [loss=sigmoid|ipo|hinge|simpo] [beta=0.1] [label_smoothing=0] [peft=lora]

Pairs (`prompt` / `chosen` / `rejected`, `llmhpc.data.preference`) are rendered with the model's chat template;
data.source=arithmetic (the default) is the package's own set: for each arithmetic problem its worked answer
over a flawed one (`llmhpc.data.arithmetic_preferences`), train pairs from the training problems and held-out
pairs from the held-out pool. The model, layout and optimizer come from the shared builder and the loop is the
shared trainer; the objective is `llmhpc.rl.dpo.DPOObjective`.

The reference is the starting model. Its log-probs of every pair are computed once, before the first step, by
the policy itself (under peft=lora with its adapters off) and cached beside the data (in run.dir when that place
is not writable), keyed on the starting weights, the pairs and the precision: later epochs, resumes and new
runs on the same data read them back, and no second model is ever held. loss=simpo needs no reference.

Layouts: one process, FSDP2 / DDP / HSDP (parallel.tp and parallel.pp must be 1, parallel.engine=torch).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from llmhpc.config import Config
from llmhpc.data.preference import PairLoader, PreferencePair, pair_eval_batches, pairs_digest
from llmhpc.parallel import dp_rank, dp_size
from llmhpc.stages.pairs import load_pairs, require_data_parallel
from llmhpc.stages.sft import fit_and_close, with_model_tokenizer
from llmhpc.train.builder import RunContext, build, distributed_run
from llmhpc.train.trainer import Trainer, TrainResult, report_done


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _cache_path(source: str, key: str) -> Path:
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return path / f".llmhpc-reference-{key[:20]}.safetensors"
    return path.parent / f".{path.name}.reference-{key[:20]}.safetensors"


def _everyone_has(found: bool, device: torch.device) -> bool:
    """True when every rank found the cache (ranks decide together: computing runs collective forwards)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return found
    flag = torch.tensor([int(found)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def cached_reference(cfg: Config, built, pairs: list[PreferencePair], source: str, pad_id: int,
                     device: torch.device) -> torch.Tensor:
    """The reference log-probs [N, 2] of `pairs`: read from the cache, or computed by the starting policy and
    cached (beside the data; in run.dir when that place is not writable)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from llmhpc.checkpoint.lineage import source_fingerprint
    from llmhpc.rl.dpo import load_cached_reference, reference_key, reference_logprobs, save_cached_reference

    key = reference_key(source_fingerprint(cfg.model.init_from), pairs_digest(pairs), cfg.precision.name)
    places = [_cache_path(source, key), Path(cfg.run.dir) / f"reference-{key[:20]}.safetensors"]
    found = next((v for v in (load_cached_reference(p, key, len(pairs)) for p in places) if v is not None), None)
    if _everyone_has(found is not None, device):
        if _is_main():
            print(f"reference log-probs: {len(pairs)} pairs read from the cache", flush=True)
        return found
    model = built.engine.model
    switch = nullcontext
    if cfg.peft.name != "none":
        from llmhpc.peft.lora import adapters_disabled

        def switch():
            return adapters_disabled(model)

    progress = tqdm(total=len(pairs), desc="reference log-probs", unit="pair", file=sys.stderr,
                    disable=not (_is_main() and cfg.logger.progress_bar))
    try:
        with switch():
            values = reference_logprobs(model, pairs, pairs_per_batch=cfg.trainer.micro_batch_size, pad_id=pad_id,
                                        device=device, context=built.engine.autocast,
                                        progress=progress.update)
    finally:
        progress.close()
    if _is_main():
        for place in places:
            try:
                save_cached_reference(place, key, values)
                print(f"reference log-probs: {len(pairs)} pairs computed, cached in {place}", flush=True)
                break
            except OSError:
                continue
        else:
            print(f"warning: reference log-probs could not be cached (none of {[str(p) for p in places]} is "
                  "writable); a resumed run computes them again", flush=True)
    return values


def run(cfg: Config) -> TrainResult:
    """Train with DPO under the layout of cfg.parallel on WORLD_SIZE processes."""
    cfg = with_model_tokenizer(cfg)
    with distributed_run(cfg) as where:
        require_data_parallel(cfg, where, "dpo")
        return _train(cfg, where)


def _train(cfg: Config, where: RunContext) -> TrainResult:
    from llmhpc.data.tokenizer import load_tokenizer
    from llmhpc.rl.dpo import REFERENCE_FREE, DPOObjective

    built = build(cfg, where)
    cfg, t, o = built.cfg, built.cfg.trainer, built.cfg.dpo
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train, held, source = load_pairs(cfg, tokenizer, o.arithmetic_pairs, o.eval_pairs)
    reference = None
    if o.loss not in REFERENCE_FREE:
        reference = cached_reference(cfg, built, train + held, source, pad, where.device)
    loader = PairLoader(train, t.micro_batch_size, cfg.run.seed, pad_id=pad, dp_rank=dp_rank(where.mesh),
                        dp_size=dp_size(where.mesh), reference=reference)
    eval_batches = pair_eval_batches(held, t.micro_batch_size, pad_id=pad, reference=reference,
                                     offset=len(train)) if t.eval_every else []
    objective = DPOObjective(loss=o.loss, beta=o.beta, label_smoothing=o.label_smoothing, simpo_gamma=o.simpo_gamma)
    trainer = Trainer(cfg, built.engine, loader, objective, components=built.components, eval_batches=eval_batches,
                      flops_per_token=built.flops_per_token, lineage=built.lineage, lr_scales=built.lr_scales)
    return fit_and_close(trainer, cfg)


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc dpo`: train, then (rank 0) report where the run ended."""
    return report_done(cfg, run(cfg))
