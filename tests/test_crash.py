"""Crash safety end to end: a real ``v3kit run`` is SIGKILLed at deterministic points (``V3KIT_TEST_KILL_AT``,
read by the training loop) and resumed; the result must equal an uninterrupted run bit for bit, row for row.
A second writer on a live run dir is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

pytestmark = pytest.mark.slow  # each kills and resumes real runs in subprocesses (about 35 s together)

ROOT = Path(__file__).resolve().parents[1]


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("V3KIT_TEST_KILL_AT", None)
    if kill_at:
        env["V3KIT_TEST_KILL_AT"] = kill_at
    return env


def _argv(run_dir: Path, *extra: str) -> list[str]:
    sets = [a for kv in [*TINY, "sft.epochs=2", f"run_dir={run_dir}"] for a in ("--set", kv)]
    return [sys.executable, "-m", "v3kit", "run", *sets, *extra]


def _run(run_dir: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(run_dir, *extra), env=_env(kill_at), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; while it runs (paused with SIGSTOP, still holding its run dir), a second
    ``v3kit run`` on the same run dir is attempted. Returns (run_dir, first's pid, the second's result)."""
    run = tmp_path_factory.mktemp("crash") / "reference"
    first = subprocess.Popen(_argv(run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "config.yaml").exists():  # written while the run dir is held
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = _run(run)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    return run, first.pid, second


def test_a_second_writer_on_a_live_run_dir_is_refused_naming_the_holder(reference):
    _, pid, second = reference
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"PID {pid}" in second.stderr and "Traceback" not in second.stderr


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# A chain of crashes in one run dir, each resumed by the next command: during RCE, around an epoch's files (its
# rows appended but no checkpoint yet / checkpoint written, rows not yet rewritten) and mid-GRPO-epoch.
KILL_POINTS = [
    "rce:epoch1:step3",
    "grpo:epoch1:before_checkpoint",
    "grpo:epoch2:after_checkpoint",
    "grpo:epoch3:step15",
]


def test_killed_and_resumed_run_equals_the_uninterrupted_one(reference, tmp_path):
    ref, _, _ = reference
    run = tmp_path / "crashed"
    for i, point in enumerate(KILL_POINTS):
        proc = _run(run, *(["--resume"] if i else []), kill_at=point)
        assert proc.returncode == -signal.SIGKILL, f"{point} was not reached: {proc.stderr[-2000:]}"
    proc = _run(run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]

    for name in ("grpo_epoch3.pt", "rce_epoch2.pt", "sft.pt"):
        got, want = _weights(run / name), _weights(ref / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert (run / "summary.csv").read_text() == (ref / "summary.csv").read_text()
    got_rows = (run / "metrics.csv").read_text().splitlines()
    want_rows = (ref / "metrics.csv").read_text().splitlines()
    assert len(got_rows) == len(want_rows)
    for i, (g, w) in enumerate(zip(got_rows, want_rows)):
        assert g == w, f"metrics.csv line {i + 1} differs"
