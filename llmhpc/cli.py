"""`llmhpc <command> [key=value ...]`: compose the command's config, run its recipe, report errors in one line.

Commands come from one table (`llmhpc.stages.registry.STAGES`); this module only parses, dispatches and
turns the errors a user can fix into `error: <one line>` with a non-zero exit code.
"""

from __future__ import annotations

import os
import sys
import textwrap


def usage() -> str:
    from llmhpc.stages.registry import STAGES

    lines = ["usage: llmhpc <command> [key=value | group=preset ...]", "", "commands:"]
    lines += [f"  {name:<14} {spec.summary}" for name, spec in STAGES.items()]
    lines += ["", "examples:"]
    lines += [f"  {spec.example}" for spec in STAGES.values() if spec.example]
    lines += ["  llmhpc pretrain --help          the config keys pretrain reads, their types and what they do"]
    return "\n".join(lines) + "\n"


def _print_keys(name: str) -> None:
    """The groups and keys command `name` reads, with their documentation."""
    from llmhpc.config.docs import key_docs
    from llmhpc.config.load import GROUPS, group_options
    from llmhpc.stages.registry import STAGES

    spec = STAGES[name]
    print(f"llmhpc {name}: {spec.summary}\n")
    if spec.raw:  # its words are not only keys: its module's first paragraph says how it is called
        import importlib

        print((importlib.import_module(spec.entry.split(":")[0]).__doc__ or "").split("\n\n")[0] + "\n")
    groups = [group for group in GROUPS if group in spec.sections]
    if groups:
        print("config groups (group=preset):")
    for group in groups:
        print(f"  {group:<10} {', '.join(group_options(group))}")
    if spec.defaults:
        print(f"\ndefaults of llmhpc {name} (before your overrides): {' '.join(spec.defaults)}")
    print("\nconfig keys (key=value):")
    for key, annotation, doc in key_docs():
        if key.split(".", 1)[0] not in spec.sections:
            continue
        if spec.shorthand and key.startswith(spec.shorthand + "."):
            key = key[len(spec.shorthand) + 1 :]
        print(f"  {key}  [{annotation}]")
        if doc:
            print(textwrap.indent(textwrap.fill(doc, 96), "      "))


def _command(args: list[str]) -> tuple[str, list[str]] | None:
    """(command name, its overrides), or None when the words name no command."""
    from llmhpc.stages.registry import STAGES

    for words in (2, 1):
        name = " ".join(args[:words])
        if len(args) >= words and name in STAGES:
            return name, args[words:]
    return None


def _error(exc: BaseException) -> None:
    """`error: <one line>` on stderr; under torchrun every rank hits the same error, and rank 0 says it once."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from llmhpc.metrics.import_noise import quiet_import_noise

    quiet_import_noise()  # before anything imports torchao (transformers and peft do): keep the console ours
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    found = _command(args)
    if found is None:
        from llmhpc.stages.registry import STAGES

        near = [name for name in STAGES if name.split()[0] == args[0]]
        hint = f"; did you mean: llmhpc {', llmhpc '.join(near)}?" if near else ""
        print(f"error: unknown command '{args[0]}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    name, overrides = found
    if "-h" in overrides or "--help" in overrides:
        _print_keys(name)
        return 0
    from llmhpc.config import ConfigError
    from llmhpc.errors import CheckpointError, InputError, TrainingAborted  # not their modules: no torch yet
    from llmhpc.stages.registry import STAGES, load_stage_config

    try:
        if STAGES[name].raw:  # it composes its configs from its own words
            return STAGES[name].run(None, overrides)
        cfg = load_stage_config(name, overrides)  # a bad config fails here, before any heavy import
        return STAGES[name].run(cfg, overrides)
    except ConfigError as exc:
        _error(exc)
        return 2
    except (FileNotFoundError, InputError, CheckpointError, TrainingAborted) as exc:
        _error(exc)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
