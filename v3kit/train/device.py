"""Where a run computes: the ``device``, ``precision`` and ``threads`` config keys, resolved once per run.

* ``device``: ``auto`` (CUDA when available, else Apple MPS when available, else CPU) | ``cpu`` | ``cuda`` |
  ``cuda:N`` | ``mps``. Models, the frozen reference, data batches, ``old_log_probs`` and metric computation live
  there; checkpoints, ``metrics.csv`` and every RNG stay on the CPU, so a run trained on a GPU loads, resumes and
  evaluates on a CPU-only machine. Shuffling and ``samples="sampled"`` draw from a CPU ``torch.Generator`` (the
  sampling probabilities are copied to the CPU for ``torch.multinomial``): CPU runs stay bit-identical to runs
  made before device support existed, and a GPU run draws the same candidates as the CPU run of the same seed.
* ``precision``: ``fp32`` | ``bf16``. ``bf16`` runs every forward pass (training steps, ``old_log_probs``, the
  reference, held-out metrics) under ``torch.autocast(dtype=bfloat16)`` on CUDA; weights, gradients, Adam state
  and log-probs stay fp32 (log_softmax autocasts to fp32). Off CUDA it is ignored with a warning and the run is
  fp32: CPU autocast would be slower than fp32 for these small matmuls, and one config file should run both on a
  GPU box and on a laptop. The run header prints the precision actually used.
* ``threads``: ``auto`` | N, torch's intra-op CPU threads, set at run start (see :func:`resolve_threads`).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Union

import torch
from torch import Tensor, nn

MAX_THREADS = 4096  # more than any machine has cores: a larger value is a typo

DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("fp32", "bf16")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Below this many parameters a model's matmuls are too small for intra-op threads to pay for their
# synchronisation: the default 16-d, 64-32 towers measured up to 18x slower with torch's default threads than
# with one on a busy 2-core machine.
SMALL_MODEL_PARAMS = 1_000_000
MAX_AUTO_THREADS = 8  # past ~8 threads the per-op fork/join cost outgrows the gain for MLP towers


def check_device_setting(device: str) -> None:
    """Syntax check at config load (availability is checked when the run starts, on the machine that runs it)."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"device must be one of {DEVICES_HELP}, got {device!r}; e.g. device=auto")


def check_precision_setting(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}; e.g. precision=fp32")


def check_threads_setting(threads: Union[str, int]) -> None:
    if threads == "auto":
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be 'auto' or an integer in [1, {MAX_THREADS}], got {threads!r}; e.g. threads=1")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` a ``device`` setting names, checked against this machine; raises a one-line
    ``ValueError`` naming ``device`` and the fix when it does not exist here."""
    if isinstance(device, torch.device):
        device = str(device)
    check_device_setting(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but CUDA is not available here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}); set device=auto or device=cpu"
            )
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"device={device!r} but this machine has {count} CUDA device(s) (cuda:0 .. "
                f"cuda:{count - 1}); pick one of them or set device=cuda"
            )
    if device == "mps" and not _mps_available():
        raise ValueError("device='mps' but Apple MPS is not available here; set device=auto or device=cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device, *, warn: bool = True) -> str:
    """The precision a run actually uses: ``bf16`` only on CUDA (see the module docstring), else ``fp32``."""
    check_precision_setting(precision)
    if precision == "bf16" and device.type != "cuda":
        if warn:
            warnings.warn(
                f"precision=bf16 is ignored on {device.type}: bf16 autocast is used on CUDA only, this run is fp32",
                stacklevel=2,
            )
        return "fp32"
    return precision


def resolve_threads(
    threads: Union[str, int], device: torch.device, n_params: int | None, cores: int | None = None
) -> int:
    """``auto``: 1 thread when the machine has <= 2 cores (other processes need them; threads would fight), when
    the model is small (< :data:`SMALL_MODEL_PARAMS` parameters: the ops finish before threads help) or when a
    GPU does the arithmetic (the host only launches kernels); else ``min(cores, 8)``."""
    check_threads_setting(threads)
    if threads != "auto":
        return int(threads)
    cores = cores if cores is not None else (os.cpu_count() or 1)
    small = n_params is not None and n_params < SMALL_MODEL_PARAMS
    if cores <= 2 or small or device.type != "cpu":
        return 1
    return min(cores, MAX_AUTO_THREADS)


@dataclass(frozen=True)
class Runtime:
    """The resolved ``device`` / ``precision`` / ``threads`` of a run (what the run header prints)."""

    device: torch.device
    precision: str
    threads: int
    requested_precision: str = "fp32"

    def describe(self) -> str:
        p = (
            self.precision
            if self.precision == self.requested_precision
            else (f"{self.precision} ({self.requested_precision} ignored off CUDA)")
        )
        return f"device {self.device}, precision {p}, threads {self.threads}"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 for ``precision="bf16"`` on CUDA; a no-op otherwise (fp32 is untouched)."""
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def module_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a model without either."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_cpu(tree: Any) -> Any:
    """``tree`` (nested dicts/lists/tuples) with every tensor on the CPU: what checkpoints store."""
    if isinstance(tree, Tensor):
        return tree if tree.device.type == "cpu" else tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def as_floats(values: list[Tensor]) -> list[float]:
    """Python floats of 0-d tensors with at most one host-device transfer (none to wait for on the CPU).

    Every value is widened to float64 before the transfer, which is exact for fp32/bf16 and bool, so each float
    equals ``t.item()``.
    """
    if not values:
        return []
    if all(t.device.type == "cpu" for t in values):
        return [t.item() for t in values]
    dev = next(t.device for t in values if t.device.type != "cpu")
    return torch.stack([t.detach().reshape(()).to(dev, torch.float64) for t in values]).cpu().tolist()


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op threads for a block and restore them after (tests, notebooks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
