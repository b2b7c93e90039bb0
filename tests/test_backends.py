"""Grid backends: Ray gives the local backend's numbers and either resumes the other's grid; one run per GPU."""

from __future__ import annotations

import sys
import time

import pandas as pd
import pytest
import yaml

from v3kit.ablate import backends, load_grid, run_grid
from v3kit.ablate.backends import (
    BackendError,
    LocalBackend,
    check_marker,
    local_worker_devices,
    ray_resources,
    worker_config,
)
from v3kit.cli import main
from v3kit.config import PACKAGED_CONFIGS, RunConfig


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: 2 CPUs and 2 declared GPUs (Ray schedules them; the runs compute on the CPU,
    as ``device: auto`` resolves to on this machine)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def smoke_grid(tmp_path) -> str:
    """The shipped smoke grid with one seed (base world and the other world): 2 SFTs and 7 runs."""
    raw = yaml.safe_load((PACKAGED_CONFIGS / "ablate_smoke.yaml").read_text())
    raw["seeds"] = [0]
    raw["worlds"]["seeds"] = [0]
    path = tmp_path / "smoke1.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


class _InterruptingBar:
    """Stands in for the grid's tqdm bar: Ctrl-C (KeyboardInterrupt) in the driver after ``after`` finished runs."""

    after = 3

    def __init__(self, *args, desc: str = "", total: int = 0, **kwargs) -> None:
        self.desc, self.total, self.n = desc, total, 0
        self.first = True

    def update(self, n: int = 1) -> None:
        if self.first:  # the grid's first update counts the runs it skipped
            self.first = False
            return
        self.n += n
        if self.desc.startswith("ablate") and self.n >= self.after:
            raise KeyboardInterrupt

    def refresh(self) -> None: ...

    def close(self) -> None: ...


def _comparable(path) -> pd.DataFrame:
    return pd.read_csv(path).drop(columns=["wall_s", "run_dir"])


@pytest.mark.slow
def test_ray_grid_matches_local_and_an_interrupted_ray_grid_finishes_locally(tmp_path, ray_cluster, monkeypatch):
    from v3kit.ablate import runner

    grid = smoke_grid(tmp_path)
    spec = load_grid(grid)
    total = len(spec.variants) * len(spec.seeds) + len(spec.worlds.levels) * len(spec.worlds.variants)

    # Ray, interrupted from the driver after 3 finished runs: the runs in flight are cancelled.
    a = tmp_path / "a"
    monkeypatch.setattr(runner, "tqdm", _InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, a, backend="ray", progress=False)
    monkeypatch.undo()
    done = {p: p.stat().st_mtime_ns for p in a.glob("*/*/seed*/result.json")}
    assert 3 <= len(done) < total

    # The local backend finishes it without redoing any of them.
    local = run_grid(spec, a, backend="local", progress=False)
    assert (local.skipped, local.executed) == (len(done), total - len(done))
    assert {p: p.stat().st_mtime_ns for p in done} == done

    # The whole grid on Ray from scratch (through the CLI) gives the local numbers bit for bit.
    b = tmp_path / "b"
    assert main(["ablate", "--grid", grid, "--out", str(b), "--backend", "ray", "--no-progress"]) == 0
    ray_frame, local_frame = _comparable(b / "results.csv"), _comparable(a / "results.csv")
    assert len(local_frame) > 0
    pd.testing.assert_frame_equal(ray_frame, local_frame, check_exact=True)
    pd.testing.assert_frame_equal(
        pd.read_parquet(b / "per_query.parquet"), pd.read_parquet(a / "per_query.parquet"), check_exact=True
    )
    assert not (b / backends.MARKER).exists()  # removed when the grid is done

    # Rerunning it on Ray executes nothing (and starts no Ray task).
    again = run_grid(spec, b, backend="ray", progress=False)
    assert (again.executed, again.skipped) == (0, total)


@pytest.mark.slow
def test_ray_tasks_declare_one_gpu_each_and_ray_gives_each_its_own(ray_cluster):
    assert ray_resources("auto", 2) == {"num_cpus": 1, "num_gpus": 1}
    assert ray_resources("cuda:1", 0) == {"num_cpus": 1, "num_gpus": 1}
    assert ray_resources("auto", 0) == {"num_cpus": 1, "num_gpus": 0}
    assert ray_resources("cpu", 2) == {"num_cpus": 1, "num_gpus": 0}
    ray = ray_cluster

    def probe():
        start = time.monotonic()
        time.sleep(0.5)
        return ray.get_gpu_ids(), start, time.monotonic()

    task = ray.remote(probe).options(**ray_resources("auto", ray.cluster_resources()["GPU"]))
    out = ray.get([task.remote() for _ in range(4)])
    assert all(len(ids) == 1 for ids, _, _ in out)
    for i, (gi, si, ei) in enumerate(out):
        for gj, sj, ej in out[i + 1 :]:
            if si < ej and sj < ei:  # ran at the same time: never on the same GPU
                assert gi != gj
    assert {ids[0] for ids, _, _ in out} == {0, 1}


def test_local_backend_gives_each_worker_its_own_gpu(monkeypatch):
    monkeypatch.setattr(backends, "cuda_device_count", lambda: 2)  # a fake two-GPU machine
    assert local_worker_devices("auto", 2) == ["cuda:0", "cuda:1"]
    assert local_worker_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert local_worker_devices("cuda:1", 2) == [None, None]  # a pinned device is respected
    assert local_worker_devices("cpu", 2) == [None, None]
    assert local_worker_devices("auto", 2, gpus=1) == [None, None]

    # The pool's workers take the slots in the order they start, and each runs its runs on its own GPU.
    made = {}

    class FakePool:
        def __init__(self, **kwargs):
            made.update(kwargs)

    monkeypatch.setattr(backends, "ProcessPoolExecutor", FakePool)
    LocalBackend(workers=2, device="auto")
    counter, slots = made["initargs"]
    cfg = RunConfig()
    seen = []
    for _ in range(2):  # what each spawned worker's initializer does
        monkeypatch.setattr(backends, "_WORKER", None)
        made["initializer"](counter, slots)
        run_cfg = worker_config(cfg)
        seen.append(run_cfg.device)
        assert run_cfg.threads == 1
    assert seen == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(backends, "_WORKER", None)
    assert worker_config(cfg) is cfg  # in the driver (workers=1) the config runs as given


def test_backend_errors_are_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(BackendError, match="missing"):
        check_marker(str(tmp_path / "missing"), "token")
    (tmp_path / "m").write_text("another driver")
    with pytest.raises(BackendError, match=str(tmp_path / "m")):
        check_marker(str(tmp_path / "m"), "token")

    grid = tmp_path / "g.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "g",
                "base": ["data.synthetic.n_queries=80"],
                "seeds": [0],
                "reference": "seed",
                "variants": {"seed": []},
            }
        )
    )
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main(["ablate", "--grid", str(grid), "--out", str(tmp_path / "o"), "--backend", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e '.[ray]'" in err
    assert main(["ablate", "--grid", str(grid), "--out", str(tmp_path / "o"), "--address", "auto"]) == 2
    assert "--backend ray" in capsys.readouterr().err
