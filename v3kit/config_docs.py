"""The config reference, generated from the docstring under each config field (one home: where it is defined).

``python -m v3kit.config_docs > docs/config.md`` regenerates the reference; ``--check`` exits 1 when the file is
stale or a field has no docstring (the tests run it).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from .ablate.grid import VARIANT_RULES
from .config import RunConfig, field_types

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass: the string literal right below each annotated field. A subclass that
    only changes a default keeps its base class's docstring (``SFTConfig.lr`` documents ``OptimConfig.lr``)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


def _own_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    return json.dumps(value)


def reference(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, doc)`` for every leaf key of the config tree, in definition order; sections recurse."""
    docs = field_docs(cls)
    rows = []
    for name, hint in field_types(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            rows += reference(hint, key + ".")
        else:
            rows.append((key, _yaml_value(_default(cls, name)), docs.get(name, "")))
    return rows


def undocumented(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Keys (sections included) without a docstring."""
    docs = field_docs(cls)
    missing = []
    for name, hint in field_types(cls).items():
        key = f"{prefix}{name}"
        if not docs.get(name):
            missing.append(key)
        if dataclasses.is_dataclass(hint):
            missing += undocumented(hint, key + ".")
    return missing


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the docstrings under each field in `v3kit/` by `python -m v3kit.config_docs > docs/config.md`",
        "(the tests check it is current). Defaults are the seed's settings (`configs/seed.yaml`). Set any key in a",
        "YAML file (`--config`) or on the command line (`--set grpo.kl_beta=0.01`).",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{k}` | `{d}` | {doc.replace('|', '&#124;')} |" for k, d, doc in reference()]

    lines += ["", "## Grid variants", "", *textwrap.wrap(VARIANT_RULES, 116, break_on_hyphens=False)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    text = render()
    if args == ["--check"]:
        missing = undocumented()
        stale = not DOC_PATH.is_file() or DOC_PATH.read_text() != text
        for key in missing:
            print(f"config field {key} has no docstring: add one under its definition", file=sys.stderr)
        if stale:
            print(f"{DOC_PATH} is stale: run `python -m v3kit.config_docs > docs/config.md`", file=sys.stderr)
        return 1 if missing or stale else 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
