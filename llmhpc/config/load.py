"""Compose a typed `Config` from the Hydra tree plus command-line overrides.

Hydra's own errors are long and name internals; users get one line instead that names the bad
key or value and the nearest valid ones (`ConfigError`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmhpc.config.layout import resolve_layout, world_size_from_env
from llmhpc.config.schema import Config
from llmhpc.config.validate import ConfigError, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMA_NAME = "llmhpc_schema"

ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def all_keys(node: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares, e.g. 'trainer.max_steps'."""
    keys = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        inner = _dataclass_of(f.type)
        if inner is not None:
            keys.extend(all_keys(inner, key + "."))
    return keys


def _dataclass_of(annotation) -> type | None:
    import llmhpc.config.schema as schema

    if isinstance(annotation, str):
        name = annotation.replace(" | None", "").replace("Optional[", "").rstrip("]")
        candidate = getattr(schema, name, None)
        return candidate if is_dataclass(candidate) else None
    return annotation if is_dataclass(annotation) else None


def group_options(group: str) -> list[str]:
    """Preset names available for a config group (files under conf/<group>/)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _nearest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    if not close:
        # Fall back to keys in the same section, which is what a user usually meant.
        section = word.rsplit(".", 1)[0] + "." if "." in word else ""
        close = [c for c in choices if c.startswith(section) and "." not in c[len(section):]][:8]
    return ", ".join(close)


GROUPS = ("model", "data", "precision", "parallel", "logger", "cluster", "peft")
"""Config groups: `group=preset` picks conf/<group>/<preset>.yaml."""


def check_override_keys(
    overrides: list[str],
    stage: str | None = None,
    sections: tuple[str, ...] | None = None,
    owners: Mapping[str, list[str]] | None = None,
) -> None:
    """Reject overrides of keys the schema does not declare, naming the nearest valid keys.

    With `sections` (what `stage` reads), a declared key of another section is refused too, naming the
    commands that read it (`owners`: section -> commands). Done before Hydra runs because its own
    message for these cases names only internals.
    """
    keys = set(all_keys())
    readable = keys if sections is None else {k for k in keys if k.split(".", 1)[0] in sections}
    groups = set(GROUPS) if sections is None else {g for g in GROUPS if g in sections}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"cannot parse override '{override}': write key=value (e.g. trainer.lr=3e-4)")
        key = override.split("=", 1)[0].lstrip("+~")
        if key in groups or key in readable:
            continue
        section = key.split(".", 1)[0]
        if key in GROUPS or key in keys:
            readers = ", ".join(f"llmhpc {name}" for name in (owners or {}).get(section, []))
            where = f"it belongs to {readers}" if readers else "no command reads it"
            raise ConfigError(
                f"'{key}' is not a key of llmhpc {stage}: {where}; llmhpc {stage} reads {', '.join(sections or ())}"
            )
        raise ConfigError(f"unknown config key '{key}'; nearest valid keys: {_nearest(key, sorted(readable))}")


def _translate(exc: BaseException) -> ConfigError:
    """Turn a Hydra/OmegaConf exception (or its cause) into one actionable line."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    text = "\n".join(str(e) for e in chain)
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = group_options(group)
        near = difflib.get_close_matches(option, options, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        return ConfigError(f"unknown {group} preset '{option}'{hint} (available: {', '.join(options)})")
    m = re.search(r"Value '([^']*)' of type '(\w+)' could not be converted to (\w+)", text)
    if m:
        key = re.search(r"full_key: (\S+)", text)
        where = key.group(1) if key else "a config key"
        return ConfigError(f"{where}: expected {m.group(3).lower()}, got '{m.group(1)}' ({m.group(2)})")
    m = re.search(r"Missing mandatory value: (\S+)", text)
    if m:
        return ConfigError(f"{m.group(1)} must be set (e.g. {m.group(1)}=...)")
    m = re.search(r"full_key: (\S+)", text)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ConfigError(f"invalid config{' at ' + m.group(1) if m else ''}: {first}")


def load_config(
    stage: str = "pretrain",
    overrides: list[str] | None = None,
    *,
    sections: tuple[str, ...] | None = None,
    owners: Mapping[str, list[str]] | None = None,
    check_layout: bool = True,
) -> Config:
    """Compose conf/config.yaml + overrides into a validated, typed `Config` for `stage`.

    `sections` (with `owners`) restricts the overrides to what the stage reads (see `check_override_keys`);
    `llmhpc.stages.registry` passes both. With `check_layout` the parallel layout is checked against this
    process's WORLD_SIZE and `trainer.micro_batch_size`, when not given, is filled in from it.
    Raises `ConfigError` (one line, names the key and a fix) on any bad key, type or value.
    """
    overrides = list(overrides or [])
    check_override_keys(overrides, stage, sections, owners)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="llmhpc"):
            dcfg: DictConfig = compose(config_name="config", overrides=overrides)
        dcfg.stage = stage
        cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    except (HydraException, OmegaConfBaseException) as exc:
        raise _translate(exc) from None
    validate(cfg)
    if check_layout:
        cfg, _ = resolve_layout(cfg, world_size_from_env())
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as written to run.dir/config.yaml and to W&B."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain containers (for W&B and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_yaml(text: str) -> Config:
    """Read a config written by `to_yaml` back into a typed, validated `Config`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None
    validate(cfg)
    return cfg
