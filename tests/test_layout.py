"""The package's import graph has no cycle among module-level imports.

Every module of ``v3kit`` is parsed with :mod:`ast` (nothing is imported). Counted as module-level: imports in the
module body and in the bodies of classes, ``if`` / ``try`` / ``with`` blocks there, since they all run when the
module is imported. Not counted: imports inside a function (lazy by design: they run on the first call, once every
module is loaded, e.g. a heavy optional dependency or a command's implementation) and imports under
``if TYPE_CHECKING:`` (never run). Importing ``a.b.c`` also runs the ``__init__`` of the packages ``a.b`` above it,
so those count too, except a module's own ancestors (Python has already started them when it reaches the module).

The folder layout is the architecture: ``FLOORS`` lists the floors from the bottom up, and a module may import (at
module level) only from its own floor or the floors below. An import inside a function may reach up only where
``LAZY_UPWARD`` names it, with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "v3kit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when a module with this body is imported (see the module docstring)."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out += _module_level(node.orelse)
        else:  # class bodies and compound statements run at import time
            for field in ("body", "orelse", "finalbody", "handlers"):
                out += _module_level([n for n in getattr(node, field, []) if isinstance(n, ast.AST)])
    return out


def imports(name: str, path: Path, known: set[str], *, lazy: bool = False) -> set[str]:
    """The package modules that importing ``name`` runs at module level (its own ancestors left out); with ``lazy``,
    also those its functions import."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str] = set()
    for node in _all_imports(tree) if lazy else _module_level(tree.body):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
            continue
        if node.level:  # relative: from the module's package, one level up per extra dot
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        targets.add(source)
        targets |= {f"{source}.{a.name}" for a in node.names}  # `from pkg import submodule`
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)} | {name}
    out: set[str] = set()
    for t in targets:
        parts = t.split(".")
        for i in range(1, len(parts) + 1):  # a module and the packages above it
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in ancestors:
                out.add(prefix)
    return out


# The old paths of moved modules (one-line shims, see v3kit/moved.py and CHANGELOG.md) sit with the entry points.
SHIMS = tuple(sorted(module_name(p) for p in PACKAGE.glob("*.py") if "alias(__name__, " in p.read_text()))

# The floors, bottom up: each entry is a subpackage (with everything in it) or a single top-level module. Every
# module of the package belongs to exactly one floor.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("infrastructure", ("v3kit.rundir", "v3kit.provenance", "v3kit.bounds", "v3kit.trackers", "v3kit.moved")),
    ("data", ("v3kit.data",)),
    ("train", ("v3kit.train",)),
    ("run", ("v3kit.config", "v3kit.run_info", "v3kit.run", "v3kit.pipeline", "v3kit.stage_reuse")),
    ("ablate", ("v3kit.ablate",)),
    ("doctor", ("v3kit.doctor",)),
    ("notebook", ("v3kit.notebook",)),
    (
        "entry points",
        (
            "v3kit",
            "v3kit.__main__",
            "v3kit.cli",
            "v3kit.config_docs",
            "v3kit.diagnose",
            "v3kit.model",
            "v3kit.text_model",
            *SHIMS,
        ),
    ),  # from v3kit.diagnose on: old public paths
)

# Imports inside a function that reach a higher floor (they run on the first call, once every module is loaded).
LAZY_UPWARD: dict[tuple[str, str], str] = {
    ("v3kit.bounds", "v3kit.train.model"): "count_params builds the model on the meta device to size it",
    ("v3kit.trackers", "v3kit.config"): "a tracker logs the run config as a flat dict",
    ("v3kit.data.shortcut", "v3kit.pipeline"): "world_shortcuts rebuilds each ablation world's training split",
    ("v3kit.train.import_sft", "v3kit.config"): "the import-sft command reads the run config ...",
    ("v3kit.train.import_sft", "v3kit.pipeline"): "... and builds its data to check the imported model",
}


def floor_of(name: str) -> int:
    """The index in ``FLOORS`` of module ``name``'s floor; ValueError when it belongs to none."""
    for i, (_, entries) in enumerate(FLOORS):
        if any(name == e or (e != "v3kit" and name.startswith(e + ".")) for e in entries):
            return i
    raise ValueError(f"{name} belongs to no floor: add it (or its subpackage) to FLOORS in tests/test_layout.py")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle (``[a, b, ..., a]``) of the directed graph, or None; depth-first search with colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_module_level_imports():
    edges = graph()
    assert len(edges) > 30 and "v3kit.data.contract" in edges  # the walk found the package
    cycle = find_cycle(edges)
    assert cycle is None, (
        "module-level import cycle: "
        + " -> ".join(cycle or [])
        + "; break it by moving the shared code down a layer (or, for a heavy or rarely used "
        "import, import it inside the function that needs it)"
    )


def test_the_data_contract_imports_nothing_of_the_package():
    # Everything that reads tables, packs or caches builds on the contract, never the reverse.
    mods = modules()
    assert imports("v3kit.data.contract", mods["v3kit.data.contract"], set(mods)) == set()
    lazy = {
        n.module
        for n in ast.walk(ast.parse(mods["v3kit.data.contract"].read_text()))
        if isinstance(n, ast.ImportFrom) and n.level
    }
    assert lazy == set(), f"v3kit.data.contract imports {lazy} (even lazily); it holds only the data contract"


def test_the_cycle_finder_finds_cycles_and_lazy_imports_do_not_count(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nfrom . import x\ntry:\n    from .y import z\n"
        "except ImportError:\n    pass\nif TYPE_CHECKING:\n    from . import w\n"
        "class C:\n    from . import v\ndef f():\n    from . import lazy\n"
    )
    got = {(n.module, tuple(a.name for a in n.names)) for n in _module_level(ast.parse(src.read_text()).body)}
    assert got == {("typing", ("TYPE_CHECKING",)), (None, ("x",)), ("y", ("z",)), (None, ("v",))}


def test_the_old_public_model_paths_still_load(tmp_path):
    # Configs and checkpoints record ``model.target``; the documented targets keep their pre-layout module paths.
    import torch

    from v3kit.model import DEFAULT_TARGET
    from v3kit.train.checkpoint import load_checkpoint, model_from_checkpoint, model_payload, save_checkpoint
    from v3kit.train.model import ModelConfig, TwoTower, build_model, import_object
    from v3kit.train.text_model import TextTwoTower

    assert DEFAULT_TARGET == "v3kit.model:TwoTower" and ModelConfig().target == DEFAULT_TARGET
    assert import_object("v3kit.model:TwoTower") is TwoTower
    assert import_object("v3kit.text_model:TextTwoTower") is TextTwoTower
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=[8], emb_dim=4)
    model = build_model(cfg, 3, 5)
    payload = model_payload(cfg, 3, 5)
    assert payload["model_config"]["target"] == "v3kit.model:TwoTower"  # what every checkpoint so far recorded
    path = save_checkpoint(tmp_path / "old.pt", {**payload, "model": model.state_dict()})
    loaded = model_from_checkpoint(load_checkpoint(path), path)
    assert type(loaded) is TwoTower
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, inside functions too; those under ``if TYPE_CHECKING:`` left out."""
    never_run = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in never_run]


def test_every_module_imports_only_its_own_floor_or_lower_ones():
    mods = modules()
    known = set(mods)
    assert {FLOORS[floor_of(n)][0] for n in mods} == {f for f, _ in FLOORS}  # every floor holds something
    up = [
        f"{n} ({FLOORS[floor_of(n)][0]}) imports {t} ({FLOORS[floor_of(t)][0]})"
        for n, p in mods.items()
        for t in sorted(imports(n, p, known))
        if floor_of(t) > floor_of(n)
    ]
    assert up == [], "an import reaches a higher floor: " + "; ".join(up) + " (move the shared code down a floor)"
    lazy_up = set()
    for n, p in mods.items():
        ups = {t for t in imports(n, p, known, lazy=True) if floor_of(t) > floor_of(n)}
        lazy_up |= {(n, t) for t in ups if not any(u.startswith(t + ".") for u in ups)}  # a module, not its package
    new, gone = sorted(lazy_up - set(LAZY_UPWARD)), sorted(set(LAZY_UPWARD) - lazy_up)
    assert not new and not gone, (
        f"imports in functions that reach a higher floor, not in LAZY_UPWARD: {new}; gone: {gone}"
    )


def test_the_floor_checks_see_an_upward_import(tmp_path):
    assert floor_of("v3kit.data.tables") < floor_of("v3kit.train.model") < floor_of("v3kit.config")
    assert floor_of("v3kit.notebook.plots") == len(FLOORS) - 2 and floor_of("v3kit.cli") == len(FLOORS) - 1
    path = tmp_path / "x.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nfrom .contract import GroupData\ndef f():\n"
        "    from ..config import load_config\nif TYPE_CHECKING:\n    from ..pipeline import run\n"
    )
    known = {"v3kit.config", "v3kit.pipeline", "v3kit.data.contract", "v3kit.data"}
    assert imports("v3kit.data.x", path, known) == {"v3kit.data.contract"}
    assert imports("v3kit.data.x", path, known, lazy=True) == {"v3kit.config", "v3kit.data.contract"}
    with pytest.raises(ValueError, match="FLOORS"):
        floor_of("v3kit.newthing")
