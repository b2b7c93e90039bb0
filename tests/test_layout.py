"""The package's import graph tells the truth: no cycle and no upward arrow, counting every import.

Every module of ``v3kit`` is parsed with :mod:`ast` (nothing is imported). Every import statement counts, wherever
it is: in the module body, in a class, in an ``if`` / ``try`` / ``with`` block, inside a function (it runs on the
first call) and under ``if TYPE_CHECKING:`` (a dependency of the types all the same). Importing ``a.b.c`` also
runs the ``__init__`` of the packages ``a.b`` above it, so those count too, except a module's own ancestors
(Python has already started them when it reaches the module).

The folder layout is the architecture: ``FLOORS`` lists the floors from the bottom up, and a module may import only
from its own floor or the floors below. Inside a function only the optional heavy dependencies of
``OPTIONAL_IMPORTS`` may be imported (so that ``import v3kit`` works without them); nothing of the package, and no
core dependency. No module imports a private name (``_x``) of another.
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


def imports(name: str, path: Path, known: set[str], *, every: bool = True) -> set[str]:
    """The package modules ``name`` imports (its own ancestors left out): every import statement, or with
    ``every=False`` only those that run when the module is imported."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str] = set()
    for node in _all_imports(tree) if every else _module_level(tree.body):
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


# The optional heavy dependencies (extras in pyproject.toml): the only imports allowed inside a function, so that
# `import v3kit` and the command line work without them. The one list of them.
OPTIONAL_IMPORTS: dict[str, str] = {
    "ray": "ray extra: v3kit ablate --backend ray",
    "mlflow": "mlflow extra: report_to mlflow",
    "wandb": "wandb extra: report_to wandb",
    "torch.utils.tensorboard": "tensorboard extra: report_to tensorboard",
    "sentence_transformers": "text extra: embedding text columns",
    "transformers": "text extra: the end-to-end text towers",
    "optuna": "search: the hyper-parameter search engine",
    "playwright": "dev extra: the browser tests",
    "safetensors": "reading Hugging Face weights",
    "psutil": "the memory check's reading of available memory, when installed",
    "matplotlib": "notebooks extra: figures (the verdict's forest plot)",
    "IPython": "notebooks extra: display in a kernel",
    "ipywidgets": "notebooks extra: the GRPO panel's widgets",
    "jupyter_client": "notebooks extra: running a notebook headless",
    "jupytext": "notebooks extra: the notebooks' .py sources",
    "papermill": "notebooks extra: notebook parameters",
}


def is_optional(module: str) -> bool:
    return any(module == o or module.startswith(o + ".") for o in OPTIONAL_IMPORTS)


# The old paths of moved modules (one-line shims, see v3kit/moved.py and CHANGELOG.md) sit with the entry points.
SHIMS = tuple(sorted(module_name(p) for p in PACKAGE.glob("*.py") if "alias(__name__, " in p.read_text()))

# The floors, bottom up: each entry is a subpackage (with everything in it) or a single top-level module. Every
# module of the package belongs to exactly one floor.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("infrastructure", ("v3kit.rundir", "v3kit.provenance", "v3kit.bounds", "v3kit.trackers", "v3kit.moved")),
    ("data", ("v3kit.data",)),
    ("train", ("v3kit.train",)),
    (
        "run",
        (
            "v3kit.config",
            "v3kit.run_info",
            "v3kit.run",
            "v3kit.pipeline",
            "v3kit.pipeline_stacked",
            "v3kit.stack_structure",
            "v3kit.stage_reuse",
        ),
    ),
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


def test_no_import_cycle_counting_every_import():
    edges = graph()
    assert len(edges) > 30 and "v3kit.data.contract" in edges  # the walk found the package
    cycle = find_cycle(edges)
    assert cycle is None, (
        "import cycle: " + " -> ".join(cycle or []) + "; break it by moving the shared code down to the floor it "
        "belongs on (an import inside a function or under TYPE_CHECKING counts too)"
    )


def test_the_data_contract_imports_nothing_of_the_package():
    # Everything that reads tables, packs or caches builds on the contract, never the reverse.
    mods = modules()
    assert imports("v3kit.data.contract", mods["v3kit.data.contract"], set(mods)) == set()
    anywhere = {
        n.module
        for n in ast.walk(ast.parse(mods["v3kit.data.contract"].read_text()))
        if isinstance(n, ast.ImportFrom) and n.level
    }
    assert anywhere == set(), f"v3kit.data.contract imports {anywhere}; it holds only the data contract"


def test_the_cycle_finder_finds_cycles_and_module_level_imports_are_told_apart(tmp_path):
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
    """Every import statement of a module: in functions and under ``if TYPE_CHECKING:`` too."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _function_imports(tree: ast.Module) -> list[tuple[str, ast.Import | ast.ImportFrom]]:
    """``(function name, import)`` for every import statement inside a function (nested ones included)."""
    return [
        (fn.name, n)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(fn)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]


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


def test_nothing_but_an_optional_dependency_is_imported_inside_a_function():
    found = []
    for name, path in modules().items():
        for fn, node in _function_imports(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if node.__class__ is ast.ImportFrom and node.level or not all(is_optional(t) for t in targets):
                found.append(f"{name}.{fn} (line {node.lineno}): {ast.unparse(node)}")
    assert found == [], (
        "imports inside functions (move them to the top of the module; only OPTIONAL_IMPORTS may wait for their "
        "first use): " + "; ".join(found)
    )


def test_no_module_imports_a_private_name_of_another():
    found = [
        f"{name} (line {node.lineno}): {ast.unparse(node)}"
        for name, path in modules().items()
        for node in _all_imports(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and (node.level or (node.module or "").startswith("v3kit"))
        and any(a.name.startswith("_") and not a.name.startswith("__") for a in node.names)
    ]
    assert found == [], "private names imported from another module (make them public or move the code): " + "; ".join(
        found
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
    assert imports("v3kit.data.x", path, known, every=False) == {"v3kit.data.contract"}
    assert imports("v3kit.data.x", path, known) == {"v3kit.config", "v3kit.pipeline", "v3kit.data.contract"}
    with pytest.raises(ValueError, match="FLOORS"):
        floor_of("v3kit.newthing")


# Each rule has one home: the pattern that defines it occurs once in the package (issue: twin implementations drift).
ONE_HOME = {
    "the group log-softmax": r"log_softmax\(",
    "the parameter count": r"def count_params\(",
    "config flattening": r"out\.update\(flat\w*\(",  # the recursive walk
    "model target resolution": r"\.resolve\(\)\}:",
    "the split seed": r"split_seed is None else",
    "the de-biasing methods": r"\"candidate_prior\", \"candidate_features\"",
    "the keys outside the experiment": r"^NOT_EXPERIMENT_KEYS = ",
}


@pytest.mark.parametrize("rule", sorted(ONE_HOME))
def test_each_rule_has_one_home(rule):
    import re

    pattern = re.compile(ONE_HOME[rule], re.M)
    where = [f"{n}:{m.group(0)}" for n, p in modules().items() for m in pattern.finditer(p.read_text())]
    assert len(where) == 1, f"{rule} is defined in {len(where)} places ({where}); keep one and import it"
