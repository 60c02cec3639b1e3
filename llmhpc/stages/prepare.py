"""`llmhpc data prepare`: tokenize data.source into packed token shards, once, before any training run."""

from __future__ import annotations

from llmhpc.config.schema import Config
from llmhpc.data.prepare import prepare_corpus


def main(cfg: Config, overrides: list[str]) -> int:
    """Prepare (or find already prepared) the shards and print their directory."""
    print(prepare_corpus(cfg.data, seed=cfg.run.seed))
    return 0
