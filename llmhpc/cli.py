"""`llmhpc <command> [key=value ...]`: compose the config, run the recipe, report errors in one line."""

from __future__ import annotations

import os
import sys
import textwrap

USAGE = """\
usage: llmhpc <command> [key=value | group=preset ...]

commands:
  pretrain       pretrain a model on a token corpus (resumes from run.dir automatically)
  data prepare   tokenize data.source into packed token shards (data.path)
  bench          train-step tokens/s vs transformers eager + compiled (default: SmolLM2-135M, 4x256)
  plan           GPU-free planner: is a layout valid, memory per GPU, step time, tokens/s, MFU
                 (no parallel.dp_*/tp/pp given: ranks the fastest layouts that fit)

examples:
  llmhpc pretrain model=tiny trainer.max_steps=50 trainer.lr=3e-4 run.dir=runs/x
  llmhpc data prepare data.source=corpus.jsonl data.path=data/corpus
  llmhpc bench precision=bf16      results go to docs/benchmarks.md and run.dir/bench.json
  llmhpc plan model=llama3_70b cluster=h100_8x8 trainer.seq_len=8192 trainer.global_batch_size=128 precision=bf16
  llmhpc pretrain --help          every config key, its type and what it does
"""


def _print_keys() -> None:
    from llmhpc.config.docs import key_docs
    from llmhpc.config.load import GROUPS, group_options

    print("config groups (group=preset):")
    for group in GROUPS:
        print(f"  {group:<10} {', '.join(group_options(group))}")
    print("\nconfig keys (key=value):")
    for key, annotation, doc in key_docs():
        print(f"  {key}  [{annotation}]")
        if doc:
            print(textwrap.indent(textwrap.fill(doc, 96), "      "))


def _run(command: str, overrides: list[str]) -> int:
    from llmhpc.config import load_config

    if command == "pretrain":
        cfg = load_config("pretrain", overrides)  # bad config fails before any heavy import
        from llmhpc.stages import pretrain

        result = pretrain.run(cfg)
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for everyone
            return 0
        print(f"done: step {result.step}, loss {result.last_loss:.4f}"
              + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
              + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""))
        return 0
    if command == "bench":
        from llmhpc.stages import bench

        cfg = load_config("bench", bench.with_defaults(overrides))
        result = bench.run(cfg)
        return 0 if result["equal_loss"] else 1
    if command == "plan":
        from llmhpc.stages import plan

        cfg = load_config("plan", overrides)
        print(plan.run(cfg, overrides))
        return 0
    if command == "data prepare":
        from llmhpc.data.prepare import prepare_corpus

        cfg = load_config("data", overrides)
        print(prepare_corpus(cfg.data, seed=cfg.run.seed))
        return 0
    print(f"error: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "data":
        if not rest or rest[0] != "prepare":
            print("error: use 'llmhpc data prepare [overrides]'", file=sys.stderr)
            return 2
        command, rest = "data prepare", rest[1:]
    if "-h" in rest or "--help" in rest:
        _print_keys()
        return 0
    from llmhpc.checkpoint import CheckpointError
    from llmhpc.config import ConfigError
    from llmhpc.train.trainer import TrainingAborted

    try:
        return _run(command, rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError, TrainingAborted) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
