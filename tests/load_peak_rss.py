"""`python tests/load_peak_rss.py MODE PATH`: load the weights at PATH one way, then write this process's peak RSS.

Every mode first does the same preamble: imports, the process group (under torchrun: gloo, one rank per process)
and the run config `model.init_from=PATH` with `parallel.dp_shard=WORLD_SIZE`. Then:

- baseline: nothing more (what every mode costs before it loads anything);
- full: `load_gguf` / `load_pretrained` without the tokenizer: the whole model in one process, as `model.init_from`
  loaded it on every rank before sharded loading;
- sharded: what `llmhpc.train.builder.build` does with init_from under FSDP2: the model on the meta device in the
  source's shape, `parallelize`, then `initialize_sharded` (materialize this rank's shards, `load_into`).

The peak (VmHWM, KiB) goes to $PEAK_RSS_DIR/rank<RANK>. The load's own cost is a mode's peak minus the baseline's
peak on the same number of processes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peak_rss import peak_rss_kib  # tests/peak_rss.py, next to this script

from llmhpc.config import load_config
from llmhpc.models.sources import locate_weights
from llmhpc.parallel import parallelize
from llmhpc.parallel.dims import validate_layout
from llmhpc.train.builder import build_model_for, initialize_sharded


def main(mode: str, path: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    cfg = load_config("pretrain", [f"model.init_from={path}", f"parallel.dp_shard={world}", "run.device=cpu"])
    if mode == "full":
        source = locate_weights(path)
        if source.format == "gguf":
            from llmhpc.models.gguf import load_gguf

            load_gguf(source.path)
        else:
            from llmhpc.models import load_pretrained

            load_pretrained(path)
    elif mode == "sharded":
        model, _ = build_model_for(cfg, torch.device("meta"))
        dims = validate_layout(cfg.parallel, world, model.cfg, cfg.trainer)
        parts = parallelize(model, dims, dims.build_mesh("cpu") if world > 1 else None, cfg.parallel)
        initialize_sharded(model, parts, cfg, torch.device("cpu"))
    elif mode != "baseline":
        raise SystemExit(f"unknown mode {mode!r}: baseline, full or sharded")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    out = Path(os.environ["PEAK_RSS_DIR"]) / f"rank{os.environ.get('RANK', '0')}"
    out.write_text(str(peak_rss_kib()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
