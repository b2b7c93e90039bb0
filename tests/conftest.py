"""Shared fixtures: a tiny synthetic world and config so end-to-end tests take seconds."""

from __future__ import annotations

import warnings

import pytest

from v3kit.config import RunConfig, load_config

TINY = [
    "progress=false",
    "data.synthetic.n_queries=240",
    "sft.epochs=3",
    "rce.epochs=2",
    "grpo.epochs=3",
]


def write_text_table(path, n_queries: int, n_cands: int) -> list[dict]:
    """A tiny text-only long-form table (JSON lines) at ``path``: candidate 0 is the label and rewards rise with the
    candidate's index; returns its rows."""
    import pandas as pd

    rows = [
        {
            "query_id": f"q{q}",
            "candidate_id": f"q{q}c{c}",
            "query_text": f"query {q}",
            "candidate_text": f"candidate {q} {c}",
            "reward": float(c),
            "is_label": c == 0,
        }
        for q in range(n_queries)
        for c in range(n_cands)
    ]
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return rows


def tiny_config(run_dir, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY, f"run_dir={run_dir}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return tiny_config(tmp_path / "run")


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        yield


def kernel_name() -> str:
    """The project's Jupyter kernel when `make setup` registered it, else the interpreter's own python3."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return "v3kit" if "v3kit" in KernelSpecManager().find_kernel_specs() else "python3"
    except Exception:
        return "python3"
