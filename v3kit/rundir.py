"""What keeps a run dir consistent: atomic file replacement, one writer at a time (``RunLock``), and the
identity of the SFT checkpoint a run started from (``file_sha256``)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
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


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"24.8 KB"`` (binary units) for one-line messages."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


UNKNOWN_FILE = "<unknown file>"  # an ENOSPC whose writer named no file (os.write, a library's own writes)


class DiskFullError(OSError):
    """A write ran out of disk space (or quota). Names the file, the bytes the write needed when known and the
    bytes free; nothing partial of it is left behind (the writer removed its temp file or truncated its append).
    The CLI adds the fix (free space, then ``--resume``)."""

    def __init__(self, path: str | Path, needed: int | None = None, free: int | None = None) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.needed, self.free = needed, free

    def __reduce__(self) -> tuple[Any, ...]:  # OSError pickles (errno, strerror): a worker's error must come back whole
        return (DiskFullError, (self.filename, self.needed, self.free))

    def __str__(self) -> str:
        sizes = [
            f"needs about {human_bytes(self.needed)}" if self.needed else "",
            f"{human_bytes(self.free)} free" if self.free is not None else "",
        ]
        detail = ", ".join(x for x in sizes if x)
        return f"{self.filename}: no space left on device" + (f" ({detail})" if detail else "")


def free_bytes(path: str | Path) -> int | None:
    """Bytes free for an unprivileged writer on the filesystem holding ``path`` (None when it cannot be read)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None


def _is_disk_full(exc: BaseException) -> bool:
    """``exc`` or an exception it was raised from is ENOSPC/EDQUOT (torch.save turns the OSError of its writer into
    ``RuntimeError: ... unexpected pos``, keeping the OSError as the context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def as_disk_full(exc: BaseException) -> DiskFullError | None:
    """The :class:`DiskFullError` that ``exc`` is, or that caused it (a grid's run, a worker process, a Ray task
    wrap it), or one made from an ENOSPC/EDQUOT ``OSError`` in its chain; None when the disk was not full."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DiskFullError):
            return cause
        cause = cause.__cause__ or cause.__context__
    if not _is_disk_full(exc):
        return None
    os_error = exc
    while not (isinstance(os_error, OSError) and os_error.errno in DISK_FULL_ERRNOS):
        os_error = os_error.__cause__ or os_error.__context__  # type: ignore[assignment]
    name = os_error.filename or UNKNOWN_FILE
    return DiskFullError(name, free=free_bytes(Path(name).parent) if os_error.filename else None)


def disk_full_error(exc: BaseException, path: str | Path, needed: int | None = None) -> BaseException:
    """A :class:`DiskFullError` naming ``path`` when ``exc`` says the disk is full (or, for a foreign exception,
    the disk has less than ``needed`` bytes free), else ``exc`` itself."""
    if isinstance(exc, DiskFullError):
        return exc
    free = free_bytes(Path(path).parent)
    if _is_disk_full(exc) or (needed and isinstance(exc, RuntimeError) and free is not None and free < needed):
        return DiskFullError(path, needed, free)
    return exc


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], None], size_hint: int | Callable[[], int] | None = None
) -> Path:
    """Replace ``path`` by what ``write(f)`` writes to a binary file, via a fsynced temp file in the same directory
    and ``os.replace``: a reader (or a resume after a crash) sees the old file or the new one, never a mix. The one
    way v3kit writes any file it may read back (checkpoints, configs, tables, results).

    A full disk raises :class:`DiskFullError` naming ``path`` and ``size_hint``, the bytes the write needs when
    given (or what counts them, called only then: a checkpoint's count walks its whole payload); the temp file is
    removed on any failure. A temp file a killed process left (``.<name>.*.tmp``) is removed by
    :func:`remove_temp_files` when the next run takes the run dir's lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file should look like any other
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        err = e
        if isinstance(e, Exception):
            err = disk_full_error(e, path, size_hint() if callable(size_hint) else size_hint)
        if err is not e:
            raise err from None
        raise
    fsync_dir(path.parent)
    return path


TEMP_FILE = re.compile(r"^\..+\.tmp$")  # atomic_write's temp files: ".<name>.<random>.tmp"


def remove_temp_files(directory: str | Path) -> list[Path]:
    """Remove the temp files a killed writer left in ``directory`` (only call it while holding the directory's
    :class:`RunLock`: then no live writer owns one). Returns what was removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if TEMP_FILE.match(p.name) and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """``obj`` as indented JSON that every parser reads: a NaN or inf (a mean over no runs, an interval of one
    seed) is written as ``null``, never as the ``NaN`` Python's json writes by default, which is not JSON."""
    return json.dumps(_finite_or_none(obj), indent=1, allow_nan=False) + "\n"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a text (UTF-8, newlines as given)."""
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data), size_hint=len(data))


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
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # a full disk: name the file (os.write's error has no file name)
            self.__exit__()
            if e.errno in DISK_FULL_ERRNOS:
                raise disk_full_error(e, self.path, 16) from e
            raise
        remove_temp_files(self.run_dir)  # we are the one writer: any temp file is a killed run's leftover
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
