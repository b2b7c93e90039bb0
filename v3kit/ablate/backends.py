"""Where a grid's tasks run: ``local`` (this process, or a pool of spawned processes on this machine) or ``ray``
(a Ray cluster, or a local Ray started on this machine's CPUs/GPUs).

Both backends run the same task functions (:func:`v3kit.ablate.worker.train_sft`, ``execute_run``) on the same task
objects, and a task's only output is its run directory (``result.json`` with its config hash, written atomically
last). The run directories are therefore the ledger whatever ran them: a grid interrupted on one backend resumes
on the other, and a finished run is never redone.

Devices: each task runs with one torch thread. The local backend gives pool worker ``k`` the GPU ``cuda:(k mod
G)`` when the machine has G >= 2 GPUs and the run's ``device`` is ``auto`` or ``cuda`` (so ``--workers G`` puts one
run on each GPU; an explicit ``cuda:N`` is respected). On Ray every task declares ``num_cpus=1`` and, when its
run's device is CUDA (``cuda``/``cuda:N``, or ``auto`` on a cluster that has GPUs), ``num_gpus=1``; Ray then
schedules one run per GPU and makes that GPU the task's ``cuda:0``.

Workers on other hosts write the run directories themselves, so the grid's output directory must be on a
filesystem every Ray node shares (NFS, Lustre, ...). The driver writes a marker file there (:data:`MARKER`) and
checks, before any task runs, that a probe on every node reads it back; every task checks it again (nodes may
join later). Either failure is one line naming the path.
"""

from __future__ import annotations

import dataclasses
import socket
import traceback
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..rundir import as_disk_full

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install -e '.[ray]'"
MARKER = ".v3kit-driver"  # written by the driver in the grid's out dir: a worker that cannot read it is elsewhere


class BackendError(ValueError):
    """A backend cannot run this grid (bad option, a worker without the shared filesystem); one line."""


# ------------------------------------------------------------------------------------------------ devices
def cuda_device_count() -> int:
    """CUDA devices this process sees (0 without CUDA); the one place tests replace to fake a GPU box."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wants_cuda(device: str, gpus: float) -> bool:
    """Whether a run with this ``device`` setting computes on CUDA where ``gpus`` GPUs are available."""
    return device.startswith("cuda") or (device == "auto" and gpus > 0)


def local_worker_devices(device: str, workers: int, gpus: int | None = None) -> list[str | None]:
    """Per local worker slot, the device its runs use instead of the config's (None: the config's own).

    With ``gpus`` >= 2 (default: this machine's) and ``device`` ``auto``/``cuda``, worker ``k`` gets
    ``cuda:(k mod gpus)``: round-robin, so with ``workers <= gpus`` no two runs share a GPU.
    """
    gpus = cuda_device_count() if gpus is None else gpus
    if gpus < 2 or device not in ("auto", "cuda"):
        return [None] * workers
    return [f"cuda:{k % gpus}" for k in range(workers)]


def ray_resources(device: str, cluster_gpus: float) -> dict[str, float]:
    """What a task declares to Ray: one CPU, and one GPU when its run computes on CUDA."""
    return {"num_cpus": 1, "num_gpus": 1 if wants_cuda(device, cluster_gpus) else 0}


# ------------------------------------------------------------------------------------------------ in a worker
_WORKER: dict[str, Any] | None = None  # set in a worker process: {"device": str | None, "ray": bool}


def _enter_worker(device: str | None, ray: bool = False) -> None:
    global _WORKER
    _WORKER = {"device": device, "ray": ray}
    torch.set_num_threads(1)  # N workers x 1 thread each: no oversubscription of the cores


def in_worker() -> bool:
    return _WORKER is not None


def worker_config(cfg: Any) -> Any:
    """``cfg`` as this worker runs it: one thread, and the worker's GPU (device is not part of a run's hash)."""
    if _WORKER is None:
        return cfg
    changes: dict[str, Any] = {"threads": 1}
    if _WORKER["ray"] and cfg.device.startswith("cuda:"):
        changes["device"] = "cuda"  # Ray shows the task its one GPU as cuda:0
    elif _WORKER["device"] is not None and cfg.device in ("auto", "cuda"):
        changes["device"] = _WORKER["device"]
    return dataclasses.replace(cfg, **changes)


def _local_worker_init(counter: Any, slots: Sequence[str | None]) -> None:
    with counter.get_lock():  # the k-th worker to start takes slot k (a replaced worker takes the next one)
        k = counter.value
        counter.value += 1
    _enter_worker(slots[k % len(slots)])


def check_marker(marker: str, token: str) -> None:
    """Raise a one-line error unless this process reads the driver's marker file (the shared filesystem)."""
    try:
        seen = Path(marker).read_text()
    except OSError:
        seen = None
    if seen != token:
        raise BackendError(
            f"this Ray worker (host {socket.gethostname()}) cannot see {marker}, which the driver wrote: the grid's "
            "out dir must be on a filesystem shared by every Ray node (NFS, Lustre, ...); pass --out on such a path"
        )


def _ray_call(fn: Callable[[Any], Any], task: Any, marker: str, token: str) -> Any:
    check_marker(marker, token)
    _enter_worker(None, ray=True)
    return fn(task)


def _probe(marker: str, token: str) -> str:
    check_marker(marker, token)
    return socket.gethostname()


# ------------------------------------------------------------------------------------------------ backends
Label = Callable[[Any], str]


def stop_on_disk_full(e: BaseException) -> None:
    """A run that failed on a full disk stops the grid with that one error (every next run would fail alike):
    the command prints it as one line (file, free space, fix); the runs finished so far are kept."""
    full = as_disk_full(e)
    if full is not None:
        raise full from None


class LocalBackend:
    """This process (``workers=1``) or a pool of ``workers`` spawned processes, one torch thread each."""

    name = "local"

    def __init__(self, workers: int = 1, device: str = "auto") -> None:
        self.workers = workers
        self.pool = None
        if workers > 1:
            ctx = get_context("spawn")
            slots = local_worker_devices(device, workers)
            self.pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_local_worker_init, initargs=(ctx.Value("i", 0), slots)
            )

    def run(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], label: Label, done: Callable[[], None], errors: list[str]
    ) -> None:
        if self.pool is None:
            for t in tasks:
                try:
                    fn(t)
                except Exception as e:  # keep the other runs going; report them all at the end
                    stop_on_disk_full(e)
                    errors.append(f"{label(t)}:\n{traceback.format_exc()}")
                done()
            return
        futures = {self.pool.submit(fn, t): t for t in tasks}
        for fut in as_completed(futures):
            try:
                fut.result()
            except Exception as e:
                stop_on_disk_full(e)
                errors.append(f"{label(futures[fut])}: {type(e).__name__}: {e}")
            done()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


class RayBackend:
    """Every task is a Ray task with :func:`ray_resources`; see the module docstring for the shared filesystem.

    ``address``: an existing cluster (``ray://host:10001`` or ``host:6379``, or ``auto``); None starts a local Ray on
    this machine (``workers`` CPUs when > 1, else all of them) and stops it at :meth:`close`. A Ray this process
    already joined (``ray.init`` in a notebook or a test) is used as it is and left running.
    """

    name = "ray"

    def __init__(self, out_dir: Path, *, address: str | None = None, workers: int = 1) -> None:
        self.ray = import_ray()  # before anything runs: a missing extra is one line, not a failed grid
        self.out_dir, self.address, self.workers = Path(out_dir).resolve(), address, workers
        self.owned = False
        self._call: Any = None

    def _start(self) -> None:
        """Join (or start) Ray, write the marker and probe every node: on the first call with tasks, so a grid with
        nothing left to run never pays Ray's start-up."""
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False}
            if self.address is not None:
                kwargs["address"] = self.address
            elif self.workers > 1:
                kwargs["num_cpus"] = self.workers
            ray.init(**kwargs)
            self.owned = True
        self.gpus = float(ray.cluster_resources().get("GPU", 0))
        self.marker = str(self.out_dir / MARKER)
        self.token = f"{socket.gethostname()}:{uuid.uuid4().hex}"
        Path(self.marker).write_text(self.token)
        self._call = ray.remote(_ray_call)
        self._check_nodes()

    def _check_nodes(self) -> None:
        """One probe per alive node reads the marker: a node without the shared filesystem fails before any run."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.ray.remote(_probe)
        refs = [
            probe.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(self.marker, self.token)
            for n in self.ray.nodes()
            if n.get("Alive")
        ]
        for ref in refs:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as e:
                raise BackendError(str(getattr(e, "cause", e))) from None

    def run(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], label: Label, done: Callable[[], None], errors: list[str]
    ) -> None:
        if not tasks:
            return
        if self._call is None:
            self._start()
        ray = self.ray
        refs = {
            self._call.options(**ray_resources(t.cfg.device, self.gpus)).remote(fn, t, self.marker, self.token): t
            for t in tasks
        }
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = getattr(e, "cause", None) or e
                        stop_on_disk_full(cause)
                        errors.append(f"{label(refs[ref])}: {type(cause).__name__}: {cause}")
                    except ray.exceptions.RayError as e:  # a worker died (OOM, a lost node)
                        errors.append(f"{label(refs[ref])}: {type(e).__name__}: {str(e).splitlines()[0]}")
                    done()
        finally:
            if pending:  # interrupted (Ctrl-C): stop the runs in flight; finished ones are in their run dirs
                # Kill their workers rather than interrupt them: an interrupt can land inside an import (torch
                # imports sympy lazily) and leave a half-initialised module in a worker that Ray would reuse for
                # the next grid. A killed worker's run-dir lock is released by the OS.
                for ref in pending:
                    ray.cancel(ref, force=True)
                # Return once they are gone: a run dir's lock is free only when its worker has exited, and the
                # caller may rerun the grid (with either backend) right away.
                ray.wait(pending, num_returns=len(pending), timeout=60)

    def close(self) -> None:
        if self._call is not None:
            Path(self.marker).unlink(missing_ok=True)
        if self.owned:
            self.ray.shutdown()


def make_backend(
    backend: str, *, workers: int, out_dir: Path, address: str | None = None, device: str = "auto"
) -> LocalBackend | RayBackend:
    """The backend a grid runs on (``device``: the grid's device setting, for the local GPU slots)."""
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "local":
        if address is not None:
            raise BackendError("--address names a Ray cluster: use it with --backend ray")
        return LocalBackend(workers, device)
    return RayBackend(out_dir, address=address, workers=workers)
