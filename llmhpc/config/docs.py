"""Per-key documentation for `llmhpc <command> --help`, read from the schema's field docstrings.

Attribute docstrings are not kept at runtime, so they are read from the schema's source with
`ast`; the schema stays the single place where a key is documented.
"""

from __future__ import annotations

import ast
import inspect

from llmhpc.config import schema


def _class_field_docs() -> dict[str, dict[str, tuple[str, str]]]:
    """{class name: {field: (annotation, docstring)}} for every dataclass in the schema."""
    tree = ast.parse(inspect.getsource(schema))
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, tuple[str, str]] = {}
        body = node.body
        for i, item in enumerate(body):
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                doc = ""
                nxt = body[i + 1] if i + 1 < len(body) else None
                is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                if is_doc and isinstance(nxt.value.value, str):
                    doc = " ".join(nxt.value.value.split())
                fields[item.target.id] = (ast.unparse(item.annotation), doc)
        out[node.name] = fields
    return out


def key_docs() -> list[tuple[str, str, str]]:
    """(dotted key, type, doc) for every leaf key of the root Config."""
    classes = _class_field_docs()
    rows: list[tuple[str, str, str]] = []

    def walk(class_name: str, prefix: str) -> None:
        for name, (annotation, doc) in classes[class_name].items():
            if annotation in classes:
                walk(annotation, f"{prefix}{name}.")
            else:
                rows.append((f"{prefix}{name}", annotation, doc))

    walk("Config", "")
    return rows
