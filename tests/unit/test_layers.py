"""The package's layers: who may import whom, and no import circle anywhere.

Every `import llmhpc...` in every module counts, including those inside functions (a lazy import is still a
dependency, and the one that closes a circle is usually lazy), and importing `a.b.c` runs the `__init__` of
`a.b` too. The rules are those a new stage author relies on to know where a piece goes.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "llmhpc"

ALLOWED = {
    # package: the llmhpc packages (first component under llmhpc) it may import
    "errors": set(),
    "process_group": set(),
    "config": {"errors"},
    "models": {"config", "errors", "checkpoint", "data", "process_group", "parallel", "metrics"},
    "parallel": {"config", "errors", "models", "metrics", "process_group"},
    "checkpoint": {"config", "errors", "process_group"},
    "data": {"config", "errors", "assets"},
    "peft": {"config", "errors", "models", "metrics"},
    "rl": {"config", "errors", "models", "data", "train", "parallel", "peft"},
    "scoring": {"config", "errors", "models", "data", "train", "rl"},
}
"""config is the bottom (it knows nothing of llmhpc above it); parallel knows no loss, no trainer and no stage;
checkpoints know no model, layout or loop; adapters (peft) know no loop or layout; the rollout engine, rewards and
RL objectives (rl) know models, data and objectives, not stages. (models may import parallel only lazily, for
sharded loading, and metrics only for its import-noise filter.)"""


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    """{module: llmhpc modules it imports, anywhere in its body, plus their packages' __init__}."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in (resolve(t) for t in targets if t.startswith("llmhpc")):
                if target is None or target == module:
                    continue
                graph[module].add(target)
                package = target.rsplit(".", 1)[0]
                while package not in ("llmhpc", module) and not module.startswith(package + "."):
                    graph[module].add(package)
                    package = package.rsplit(".", 1)[0]
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_no_import_circle() -> None:
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(_modules()):
        if module not in state:
            visit(module)


def test_each_layer_imports_only_what_is_below_it() -> None:
    wrong = []
    for module, targets in _import_graph().items():
        allowed = ALLOWED.get(_layer(module))
        if allowed is None:
            continue
        for target in targets:
            layer = _layer(target)
            if layer != _layer(module) and layer not in allowed and target != "llmhpc":
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_check_sees_lazy_imports() -> None:
    """A guard on the test itself: the builder imports the pipeline inside a function, and it is seen."""
    assert "llmhpc.parallel.pipeline" in _import_graph()["llmhpc.train.builder"]
