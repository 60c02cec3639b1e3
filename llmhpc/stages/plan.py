"""`llmhpc plan`: estimate memory and speed of a layout on a cluster, or rank layouts, without a GPU."""

from __future__ import annotations

from llmhpc.config.schema import Config
from llmhpc.plan.cluster import Cluster
from llmhpc.plan.efficiency import stack
from llmhpc.plan.layout import Layout
from llmhpc.plan.report import detail, header, ranking
from llmhpc.plan.search import SEARCHED_KEYS, evaluate, search
from llmhpc.plan.workload import Workload

LAYOUT_KEYS = ("parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "parallel.pp")
"""Giving any of these on the command line asks for that layout; giving none asks for a search."""


def given_keys(overrides: list[str]) -> set[str]:
    """Dotted keys set on the command line (`parallel=single` style group picks are not keys)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def run(cfg: Config, overrides: list[str]) -> str:
    """The report text; raises `ConfigError` (one line) on an invalid cluster or layout."""
    cluster = Cluster.of(cfg.cluster)
    chosen = stack(cfg.plan.stack)
    keys = given_keys(overrides)
    top = header(Workload.of(cfg), cluster, chosen.name, cfg.model.name)
    if cfg.plan.search or not keys & set(LAYOUT_KEYS):
        found = search(cfg, cluster, chosen, keys & set(SEARCHED_KEYS))
        body = ranking(found, cfg.plan.top, cluster)
        best = next((c for c in found if c.fits), None)
        if best is not None:
            body += "\n\nfastest layout that fits:\n" + detail(best, cluster)
        return f"{top}\n\n{body}"
    layout = Layout.of(cfg, cluster.world_size)
    return f"{top}\n\n{detail(evaluate(cfg, layout, cluster, chosen), cluster)}"


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc plan`: print the report."""
    print(run(cfg, overrides))
    return 0
