"""What keeps a run dir consistent: atomic file replacement, one writer at a time (``RunLock``), and the
identity of the SFT checkpoint a run started from (``file_sha256``)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (the new directory entry survives a power cut, not only a kill)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform/filesystem lets a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Replace ``path`` by what ``write(f)`` writes to a binary file, via a fsynced temp file in the same directory
    and ``os.replace``: a reader (or a resume after a crash) sees the old file or the new one, never a mix. The one
    way v3kit writes any file it may read back (checkpoints, configs, tables, results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file should look like any other
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a text (UTF-8, newlines as given)."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_frame(path: str | Path, frame: Any) -> Path:
    """:func:`atomic_write` of a pandas frame: Parquet for ``.parquet``, else CSV (without the index)."""
    if Path(path).suffix == ".parquet":
        return atomic_write(path, lambda f: frame.to_parquet(f, index=False))
    return atomic_write_text(path, frame.to_csv(index=False))


class RunDirBusyError(RuntimeError):
    """Another process is writing the same run dir (it holds ``run_dir/.lock``)."""


class RunLock:
    """One writer per run dir: an advisory ``flock`` on ``run_dir/.lock`` (the holder's PID written inside), held
    for a whole ``run_pipeline``. Two writers would interleave checkpoints and metrics rows of two runs. The lock
    dies with its process (even on SIGKILL), so a crashed run never blocks its own ``--resume``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if fcntl is None:  # no flock on this platform: run unguarded rather than not at all
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusyError(
                f"run_dir {self.run_dir} is being written by another v3kit process (PID {holder}, holding "
                f"{self.path}); wait for it to finish or stop it, or use another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
