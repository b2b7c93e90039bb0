"""The public API keeps its promise: every import path the docs show, and every one the previous release showed,
still imports; a path that moved warns with a DeprecationWarning naming the new one (``CHANGELOG.md`` lists them).

``OLD_RELEASE_PATHS`` was extracted once from the README, ``docs/``, ``notebooks/`` and ``examples/`` of the release
before the package was grouped by floors (commit 1a63d05, the first parent of the layout merge): every
``from v3kit.X import Y``, ``import v3kit.X``, ``v3kit.X:Class`` target and ``v3kit.X.Y`` named in the prose. The
current docs are read at test time, so a path added to them is checked too (and must not be a deprecated one).
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest

import v3kit

ROOT = Path(__file__).resolve().parents[1]

OLD_RELEASE_PATHS = (
    "v3kit",
    "v3kit:ablate",
    "v3kit:diagnose",
    "v3kit:load_config",
    "v3kit:load_sft",
    "v3kit:prepare_data",
    "v3kit:report_plots",
    "v3kit:run_grpo",
    "v3kit:run_pipeline",
    "v3kit:run_rce",
    "v3kit:shortcut",
    "v3kit.baselines:baseline_table",
    "v3kit.checkpoint:check_finite_weights",
    "v3kit.cli:main",
    "v3kit.config",
    "v3kit.config:load_config",
    "v3kit.config:resolve_config_file",
    "v3kit.config_docs",
    "v3kit.diagnose",
    "v3kit.diagnose:diagnose",
    "v3kit.doctor_grid",
    "v3kit.doctor_grid:write_doctor_grid",
    "v3kit.grpo",
    "v3kit.grpo:run_grpo",
    "v3kit.grpo_panel",
    "v3kit.grpo_panel:ComparePanel",
    "v3kit.grpo_panel:GRPOStart",
    "v3kit.import_sft",
    "v3kit.import_sft:import_sft",
    "v3kit.investigate",
    "v3kit.investigate:investigate",
    "v3kit.live",
    "v3kit.live:LivePlot",
    "v3kit.losses:group_log_probs",
    "v3kit.model",
    "v3kit.model:TwoTower",
    "v3kit.model:model_inputs",
    "v3kit.notebook_tools",
    "v3kit.notebook_tools:grpo_temperature",
    "v3kit.notebook_tools:notebook_config",
    "v3kit.notebook_tools:record",
    "v3kit.notebook_tools:resolve_path",
    "v3kit.notebook_tools:resolve_run_dir",
    "v3kit.notebook_tools:resolve_target",
    "v3kit.pipeline",
    "v3kit.pipeline:ensure_rce",
    "v3kit.pipeline:ensure_stage1",
    "v3kit.pipeline:load_table",
    "v3kit.pipeline:prepare_data",
    "v3kit.pipeline:run_pipeline",
    "v3kit.pipeline:stage_options",
    "v3kit.pipeline:stage_table",
    "v3kit.plots",
    "v3kit.plots:grpo_panels",
    "v3kit.plots:plot_ratio_hist",
    "v3kit.plots:plot_stage1",
    "v3kit.plots:show",
    "v3kit.rce_analysis",
    "v3kit.rce_analysis:add_rce_floor",
    "v3kit.rce_analysis:plateau_check",
    "v3kit.rce_analysis:rce_floor",
    "v3kit.reward_stats",
    "v3kit.reward_stats:stage1_summary",
    "v3kit.sft",
    "v3kit.sft:sft_baseline",
    "v3kit.shortcut",
    "v3kit.stdlib_search",
    "v3kit.stdlib_search:reward_label_agreement",
    "v3kit.synthetic:make_world",
    "v3kit.text_model",
    "v3kit.text_model:TextTwoTower",
    "v3kit.trackers:reporting",
    "v3kit.training:Callback",
)

# Modules of the previous release that moved when the package was grouped by floors; each old path is a shim.
MOVED_MODULES = {
    "v3kit.baselines": "v3kit.train.baselines",
    "v3kit.cache": "v3kit.data.cache",
    "v3kit.checkpoint": "v3kit.train.checkpoint",
    "v3kit.debias": "v3kit.data.debias",
    "v3kit.device": "v3kit.train.device",
    "v3kit.distributed": "v3kit.train.distributed",
    "v3kit.doctor_grid": "v3kit.doctor.grid",
    "v3kit.grpo": "v3kit.train.grpo",
    "v3kit.grpo_panel": "v3kit.notebook.grpo_panel",
    "v3kit.import_sft": "v3kit.train.import_sft",
    "v3kit.ingest": "v3kit.data.ingest",
    "v3kit.investigate": "v3kit.doctor.investigate",
    "v3kit.live": "v3kit.notebook.live",
    "v3kit.losses": "v3kit.train.losses",
    "v3kit.metrics": "v3kit.train.metrics",
    "v3kit.metrics_log": "v3kit.train.metrics_log",
    "v3kit.notebook_tools": "v3kit.notebook.tools",
    "v3kit.plots": "v3kit.notebook.plots",
    "v3kit.rce": "v3kit.train.rce",
    "v3kit.rce_analysis": "v3kit.doctor.rce_analysis",
    "v3kit.report_plots": "v3kit.notebook.report_plots",
    "v3kit.reward_stats": "v3kit.data.reward_stats",
    "v3kit.selection": "v3kit.train.selection",
    "v3kit.sft": "v3kit.train.sft",
    "v3kit.shortcut": "v3kit.data.shortcut",
    "v3kit.stdlib_search": "v3kit.data.stdlib_search",
    "v3kit.synthetic": "v3kit.data.synthetic",
    "v3kit.tables": "v3kit.data.tables",
    "v3kit.text": "v3kit.data.text",
    "v3kit.training": "v3kit.train.training",
    "v3kit.verdict_report": "v3kit.doctor.verdict_report",
}

# Names that moved out of a module that stayed (the old module resolves them with a warning).
MOVED_NAMES = {
    "v3kit.pipeline": ("v3kit.stage_reuse", ("STATE_FILE", "ensure_rce", "ensure_stage1", "read_state")),
}


def forget(module: str) -> None:
    """Drop a shim's alias, so the next import runs the shim (and warns) as a first import in a process would."""
    if module in MOVED_MODULES:
        sys.modules.pop(module, None)
        parent, _, leaf = module.rpartition(".")
        if hasattr(sys.modules[parent], leaf):
            delattr(sys.modules[parent], leaf)


def new_path(module: str, name: str | None) -> str | None:
    """Where ``module``(``:name``) lives now, or None when it did not move."""
    if module in MOVED_MODULES:
        return MOVED_MODULES[module]
    if module == "v3kit" and name and f"v3kit.{name}" in MOVED_MODULES:  # ``from v3kit import shortcut``
        return MOVED_MODULES[f"v3kit.{name}"]
    if module in MOVED_NAMES and name in MOVED_NAMES[module][1]:
        return MOVED_NAMES[module][0]
    if module == "v3kit.model" and name and name not in v3kit.model.__all__:
        return "v3kit.train.model"
    return None


def resolve(path: str) -> object:
    """Run ``from module import name`` (or ``import module``) as a user's code would, the first time in a process."""
    module, _, name = path.partition(":")
    forget(f"{module}.{name}" if module == "v3kit" and name else module)  # ``from v3kit import shortcut`` too
    namespace: dict[str, object] = {}
    statement = f"from {module} import {name} as found" if name else f"import {module} as found"
    exec(compile(statement, __file__, "exec"), namespace)  # the warning points at this file, as at a user's line
    return namespace["found"]


def moved_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message) for w in caught if issubclass(w.category, DeprecationWarning) and " moved to " in str(w.message)
    ]


@pytest.mark.parametrize("path", OLD_RELEASE_PATHS)
def test_every_path_of_the_previous_release_imports_and_warns_where_it_moved(path):
    module, _, name = path.partition(":")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = resolve(path)
    assert obj is not None
    target = new_path(module, name or None)
    got = moved_warnings(caught)
    if target is None:
        assert got == [], f"{path} did not move but warns: {got}"
    else:
        assert any(target in m for m in got), f"{path} moved to {target}; its warning must name it, got {got}"
        assert all(w.filename == __file__ for w in caught if " moved to " in str(w.message)), (
            "the warning must point at the importing line (stacklevel)"
        )


def test_a_moved_module_is_the_new_module():
    # The shim aliases the module: private names, isinstance checks and monkeypatching behave as before the move.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for old, new in MOVED_MODULES.items():
            forget(old)
            assert importlib.import_module(old) is importlib.import_module(new), old
        from v3kit.training import Callback
    from v3kit.train.training import Callback as NewCallback

    assert Callback is NewCallback


REF = re.compile(r"v3kit(?:\.[A-Za-z_]\w*)+")
FROM = re.compile(r"from\s+(v3kit(?:\.\w+)*)\s+import\s+(\([^)]*\)|[^\n#]+)")


def current_doc_paths() -> set[str]:
    """The import paths the README, docs, notebooks and examples of this checkout name (as in OLD_RELEASE_PATHS)."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.py"))]
    texts += sorted((ROOT / "examples").rglob("*.py")) + sorted((ROOT / "examples").rglob("*.yaml"))
    found: set[str] = set()
    for path in texts:
        text = path.read_text()
        for m in FROM.finditer(text):
            for name in re.split(r"[,\s]+", m.group(2).strip("() \n")):
                if re.fullmatch(r"[A-Za-z_]\w*", name) and name != "as":
                    found.add(f"{m.group(1)}:{name}")
        for m in REF.finditer(text):
            found.add(m.group(0))
    return found


def split_dotted(dotted: str) -> str:
    """``v3kit.train.training.Callback`` -> ``v3kit.train.training:Callback`` (the longest importable module)."""
    if ":" in dotted:
        return dotted
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if module == "v3kit.__main__":
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return module + (f":{parts[i]}" if i < len(parts) else "")
    raise AssertionError(f"no importable module in {dotted}")


def test_the_current_docs_name_only_paths_that_import_without_a_warning():
    paths = sorted({split_dotted(p) for p in current_doc_paths()})
    assert len(paths) > 30 and "v3kit.notebook.tools:notebook_config" in paths  # the scan found the docs
    for path in paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert resolve(path) is not None
        assert moved_warnings(caught) == [], f"the docs show {path}, a deprecated path: show its new one"


def test_every_moved_module_is_a_small_shim_and_the_changelog_names_the_move():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    for old, new in MOVED_MODULES.items():
        shim = ROOT / (old.replace(".", "/") + ".py")
        code = [ln for ln in shim.read_text().splitlines() if ln.strip() and not ln.startswith(("#", '"""'))]
        assert code[-1] == "alias(__name__, " + new.rpartition(".")[2] + ")" and len(code) == 3, shim
        assert f"`{old}` → `{new}`" in changelog, f"CHANGELOG.md does not record {old} -> {new}"
    for old, (new, names) in MOVED_NAMES.items():
        for name in names:
            assert f"`{old}.{name}` → `{new}.{name}`" in changelog, (old, name)


def test_the_public_names_are_documented():
    api = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in v3kit.__all__ if f"`{n}`" not in api]
    assert missing == [], f"docs/api.md does not list v3kit.{missing}"
