"""Support for the notebooks in ``notebooks/``: their shared config, named results for the tests, their sources.

The notebooks' source of truth is a jupytext py:percent file per notebook (``notebooks/NN_name.py``); the
``.ipynb`` beside it is generated (``make notebooks``), paired through jupytext and never committed, so running and
saving a notebook in JupyterLab changes no tracked file except the code you edited. ``make lab`` syncs them first.

Command line::

    python -m v3kit.notebook.tools check   # exit 1 if a notebook source is not clean (one parameters cell, kernel)
    v3kit notebook 03_grpo -p smoke True -p kl_beta 0.01 --out out.ipynb   # run one headless (CI), see run_notebook
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config import RunConfig, from_dict
from ..run import grpo_temperature  # noqa: F401 - the notebooks' documented path (the rule lives in v3kit.run)
from ..train.model import resolve_target as model_target

KERNEL = "v3kit"  # the Jupyter kernel `make lab` installs; the notebook sources name it
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the repository (for an editable install)


# Sizes for smoke=True: each notebook runs in well under 30 s on 2 CPU cores.
SMOKE = {"n_queries": 300, "sft_epochs": 4, "rce_epochs": 2, "grpo_epochs": 2}


# ----------------------------------------------------------------------------------------------- config
def notebook_config(
    *,
    run_dir: str = "runs/notebooks",
    seed: int = 0,
    smoke: bool = False,
    n_queries: int | None = None,
    sft_epochs: int | None = None,
    rce_epochs: int | None = None,
    rce_lr: float | None = None,
    grpo_epochs: int | None = None,
    grpo_lr: float | None = None,
    grpo: dict[str, Any] | None = None,
    rce: dict[str, Any] | None = None,
) -> RunConfig:
    """The seed's settings (``configs/seed.yaml``) with the notebook parameters applied.

    ``None`` keeps the seed's value, or the :data:`SMOKE` size when ``smoke``; ``grpo`` / ``rce`` are further
    config keys of those sections (validated like a YAML config).
    """

    def pick(value: Any, name: str) -> Any:
        return value if value is not None else SMOKE.get(name) if smoke else None

    raw: dict[str, Any] = {
        "run_dir": str(resolve_run_dir(run_dir)),
        "seed": int(seed),
        "progress": False,
        "data": {"synthetic": {}},
        "sft": {},
        "rce": dict(rce or {}),
        "grpo": dict(grpo or {}),
    }
    for section, key, value in (
        ("synthetic", "n_queries", pick(n_queries, "n_queries")),
        ("sft", "epochs", pick(sft_epochs, "sft_epochs")),
        ("rce", "epochs", pick(rce_epochs, "rce_epochs")),
        ("rce", "lr", rce_lr),
        ("grpo", "epochs", pick(grpo_epochs, "grpo_epochs")),
        ("grpo", "lr", grpo_lr),
    ):
        if value is not None:
            (raw["data"]["synthetic"] if section == "synthetic" else raw[section])[key] = value
    return from_dict(RunConfig, raw)


def resolve_run_dir(run_dir: str | Path) -> Path:
    """A relative ``run_dir`` is relative to the repository, not to the kernel's cwd (``notebooks/``), so the
    notebooks write where the README says (``runs/notebooks``); outside a checkout, to the cwd."""
    return resolve_path(run_dir)


def project_root() -> Path:
    """What a relative path given to a notebook is relative to: the repository, whatever the kernel's cwd; outside a
    checkout, the cwd."""
    return PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()


def resolve_path(path: str | Path) -> Path:
    """A relative path given to a notebook (run dir, data file, checkpoint) is relative to :func:`project_root`.
    Absolute paths are returned as they are."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def resolve_target(target: str) -> str:
    """A model class ``path/to/models.py:Class`` with its file resolved against :func:`project_root`
    (:func:`v3kit.train.model.resolve_target`); an importable ``pkg.module:Class`` is returned unchanged."""
    return model_target(target, base=project_root())


# ----------------------------------------------------------------------------------------------- results
RESULT_MIME = "application/vnd.v3kit.result+json"


def record(**values: Any) -> None:
    """Attach named results to the running notebook's output (scrapbook-style glue), invisibly.

    Tests read them back with :func:`read_results` instead of parsing printed text or counting cells, so rewording
    a message or moving a cell breaks no test. Values must be JSON-serialisable (numbers, strings, lists, dicts).
    """
    from IPython.display import display

    payload = json.loads(json.dumps(values, default=float))  # fail here, not in the test, on odd values
    display({RESULT_MIME: payload, "text/plain": ""}, raw=True)


def read_results(nb: Any) -> dict[str, Any]:
    """Every value :func:`record` attached to an executed notebook (later records win)."""
    found: dict[str, Any] = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            found.update(out.get("data", {}).get(RESULT_MIME, {}))
    return found


# ----------------------------------------------------------------------------------------------- sources
def _jupytext() -> Any:
    import jupytext

    return jupytext


def source_files(nb_dir: str | Path = PROJECT_ROOT / "notebooks") -> list[Path]:
    """The notebooks' sources of truth: py:percent files ``NN_name.py`` (the ``.ipynb`` are generated)."""
    return sorted(Path(nb_dir).glob("[0-9][0-9]_*.py"))


def to_ipynb(source: str | Path, dest: str | Path, parameters: dict[str, Any] | None = None) -> Path:
    """Write the notebook of a py:percent ``source`` to ``dest`` (no outputs), with ``parameters`` injected after
    its ``parameters`` cell the way papermill does."""
    nb = _jupytext().read(str(source))
    if parameters:
        from papermill.parameterize import parameterize_notebook

        nb = parameterize_notebook(nb, parameters)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _jupytext().write(nb, str(dest), fmt="ipynb")
    return dest


def source_problems(path: str | Path) -> list[str]:
    """Why a notebook source is not as committed sources must be: not exactly one ``parameters`` cell, papermill's
    injected cell, or another kernel than the project's."""
    nb = _jupytext().read(str(path))
    found = []
    n_params = sum("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    if n_params != 1:
        found.append(f"{path}: {n_params} cells tagged 'parameters' (papermill needs exactly one)")
    if any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells):
        found.append(f"{path}: holds papermill's injected-parameters cell; delete it")
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != KERNEL:
        found.append(f"{path}: kernel {kernel!r}, expected {KERNEL!r} (the kernel `make lab` installs)")
    return found


# ----------------------------------------------------------------------------------------------- headless runs
def notebook_source(name: str | Path, nb_dir: str | Path = PROJECT_ROOT / "notebooks") -> Path:
    """The py:percent source a notebook name means: ``03_grpo``, ``03``, ``03_grpo.py`` or a path to a ``.py``."""
    path = Path(name)
    if path.suffix == ".py" and path.is_file():
        return path
    stem = path.stem if path.suffix in (".py", ".ipynb") else str(name)
    found = [p for p in source_files(nb_dir) if p.stem == stem or p.stem.split("_", 1)[0] == stem]
    if len(found) != 1:
        names = [p.stem for p in source_files(nb_dir)]
        raise ValueError(f"no notebook {str(name)!r} in {nb_dir}; one of {names} (or a path to a jupytext .py)")
    return found[0]


def parse_parameter(value: str, key: str = "") -> Any:
    """A ``-p`` value as papermill's command line reads it (``True``/``False``/``None``, ints, floats, else a
    string), plus YAML lists and mappings (``[0.0, 0.1]``, ``{kl_beta: 0.1}``). ``key`` names the parameter in the
    one-line error."""
    from papermill.cli import _resolve_type  # papermill's own -p parser, so both read a value alike

    resolved = _resolve_type(value)
    if isinstance(resolved, str) and resolved.strip()[:1] in ("[", "{"):
        try:
            return yaml.safe_load(resolved)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(
                f"-p {key} {value!r}: looks like a YAML list/mapping but does not parse ({problem}); "
                "quote it as one shell word, e.g. -p kl_betas '[0.0, 0.1]'"
            ) from None
    return resolved


def check_parameter_types(name: str, params: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse, naming the parameter, a value of another kind than the notebook's default (a number for a number,
    true/false for a flag, a list for a list): the notebook would otherwise fail cells later, naming a cell only."""
    kinds = ((bool, "True or False"), ((int, float), "a number"), (list, "a list"), (dict, "a mapping"))
    for key, value in params.items():
        default = defaults.get(key)
        if value is None:  # None stands for "the notebook's own choice" in the parameters cells
            continue
        for kind, words in kinds:
            is_kind = isinstance(default, kind) and not (kind is not bool and isinstance(default, bool))
            if is_kind:
                ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                if not ok:
                    raise ValueError(f"-p {key} {value!r}: {name} expects {words} (its default is {default!r})")
                break


def default_kernel(nb: Any) -> str:
    """The notebook's own kernel (``v3kit``, registered by ``make lab``) when installed, else ``python3``."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        specs = KernelSpecManager().find_kernel_specs()
    except Exception:
        return "python3"
    own = nb.metadata.get("kernelspec", {}).get("name", KERNEL)
    return own if own in specs else "python3"


def run_notebook(
    name: str | Path,
    parameters: dict[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    kernel: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Execute notebook ``name`` headless from its py:percent source (jupytext converts it in memory, papermill
    injects ``parameters`` and runs it with the notebooks' directory as cwd); writes the executed ``.ipynb`` to
    ``out`` (default ``runs/notebooks/executed/NN_name.ipynb``). A failing cell raises papermill's
    ``PapermillExecutionError``; the written notebook then shows the error."""
    try:
        import papermill
    except ImportError:
        raise ImportError("v3kit notebook needs papermill and jupytext: pip install -e '.[notebooks]'") from None

    src = notebook_source(name)
    params = dict(parameters or {})
    nb = _jupytext().read(str(src))
    defaults = _parameter_defaults(nb)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{src.name} has no parameter(s) {unknown}; its parameters: {sorted(defaults)}")
    check_parameter_types(src.name, params, defaults)
    out = Path(out) if out is not None else Path("runs/notebooks/executed") / f"{src.stem}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        nb,
        str(out),
        parameters=params,
        kernel_name=kernel or default_kernel(nb),
        cwd=str(src.parent),
        progress_bar=False,
        execution_timeout=timeout,
    )
    return out


def _parameter_defaults(nb: Any) -> dict[str, Any]:
    """The parameters cell's names and their default values (None where the default is not a literal)."""
    defaults: dict[str, Any] = {}
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign):
                    try:
                        value = ast.literal_eval(node.value)
                    except ValueError:
                        value = None
                    defaults.update({t.id: value for t in node.targets if isinstance(t, ast.Name)})
    return defaults


def cmd_notebook(args: Any) -> int:
    params: dict[str, Any] = {}
    for key, value in args.parameters or []:
        params[key] = parse_parameter(value, key)
    try:
        from papermill.exceptions import PapermillExecutionError
    except ImportError:
        raise ImportError("v3kit notebook needs papermill and jupytext: pip install -e '.[notebooks]'") from None

    try:
        out = run_notebook(args.name, params, args.out, kernel=args.kernel)
    except PapermillExecutionError as e:
        where = args.out or f"runs/notebooks/executed/{notebook_source(args.name).stem}.ipynb"
        given = f" with -p {', '.join(f'{k}={v!r}' for k, v in params.items())}" if params else ""
        print(
            f"v3kit notebook: {args.name} failed in cell {e.exec_count}: {e.ename}: {' '.join(str(e.evalue).split())}"
            f"{given} (the executed notebook with the traceback: {where})",
            file=sys.stderr,
        )
        return 1
    print(f"executed {out}")
    return 0


def register_cli(subparsers: Any) -> None:
    """``v3kit notebook NN_name [-p KEY VALUE ...] [--out PATH]``: run a notebook headless (CI)."""
    p = subparsers.add_parser("notebook", help="run a notebook headless from its .py source through papermill (CI)")
    p.add_argument("name", help="notebook: 03_grpo, 03, or a path to a jupytext .py")
    p.add_argument(
        "-p",
        "--parameter",
        dest="parameters",
        nargs=2,
        action="append",
        metavar=("KEY", "VALUE"),
        help="a parameter, read as papermill -p reads it (True, 0.01, None, text; also [0.0, 0.1])",
    )
    p.add_argument("--out", help="the executed .ipynb (default runs/notebooks/executed/NN_name.ipynb)")
    p.add_argument("-k", "--kernel", help="Jupyter kernel (default: the notebook's, v3kit, else python3)")
    p.set_defaults(func=cmd_notebook)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m v3kit.notebook.tools check [SOURCE.py ...]``: exit 1 if a notebook source is not clean."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "check":
        print("usage: python -m v3kit.notebook.tools check [notebooks/NN_name.py ...]", file=sys.stderr)
        return 2
    problems = [msg for p in (args[1:] or source_files()) for msg in source_problems(p)]
    for msg in problems:
        print(msg, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
