"""A packed, memory-mapped cache of a long-form data file, so the second load is near-instant.

Layout, next to the data file: ``<file>.v3kit-cache/<feature_dtype>/`` holding one ``.npy`` per
:class:`~v3kit.data.GroupData` field (``query_x``, ``cand_x`` in ``feature_dtype``; ``mask``, ``labels``,
``rewards``, ``utility``; ``query_ids``) and ``meta.json``.

Key: ``meta.json`` records the data file's size, ``mtime_ns`` and SHA-256, the cache format version and the feature
dtype. A cache whose size and mtime match is used without reading the data file (fast path); when only the mtime
differs (a copy, a ``touch``), the file's SHA-256 decides, and a match refreshes the recorded mtime. Anything else
rebuilds the cache, which is written to a temporary directory and renamed into place (never half-written).

Verified, not trusted: every cached ``.npy`` is listed with its size and CRC-32 (``meta.json`` for the packed
arrays, ``done`` for a split), written with it and checked each time it is opened. A missing, truncated or edited
file (even one with the same size and mtime) makes the kit rebuild that part (the packed arrays or the split) with a
one-line note on stderr; it is never trained on. CRC-32 (zlib, ~3.5 GB/s) catches any accidental damage; it is no
defence against a deliberate forgery, but whoever can edit the cache can edit the data file too. The check reads
each file once per load (``benchmarks/cache_checksum.py`` measures it); the arrays are still opened with
``np.load(mmap_mode="c")`` (copy-on-write: writable, so ``torch.from_numpy`` accepts them, yet no write reaches the
file), so memory holds what the batches touch. The data was validated when the cache was built, so its values are
not re-checked.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..rundir import atomic_write_text, file_sha256
from .contract import GroupData, Splits, check_feature_dtype, split_by_query, split_indices, to_feature_dtype
from .tables import load_groups

CACHE_VERSION = 3  # 2: cand_ids; 3: per-file CRC-32 in meta.json / done
_FIELDS = ("query_x", "cand_x", "mask", "labels", "rewards", "utility", "cand_ids")


def cache_dir(path: str | Path, feature_dtype: str = "float32") -> Path:
    path = Path(path)
    return path.with_name(path.name + ".v3kit-cache") / feature_dtype


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


_REQUIRED = ("query_x.npy", "cand_x.npy", "mask.npy", "labels.npy", "rewards.npy", "query_ids.npy")


def _well_formed(files: object, prefix: str = "") -> bool:
    """A file listing as v3kit writes it: every required array, each with an int size and CRC-32."""
    return (
        isinstance(files, dict)
        and all(f"{prefix}{n}" in files for n in _REQUIRED)
        and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("crc32"), int)
            for v in files.values()
        )
    )


def _valid(path: Path, where: Path, feature_dtype: str) -> bool:
    """Whether the cache in ``where`` was built from ``path`` as it is now, by this cache version (its files are
    verified when opened). A damaged ``meta.json`` is reported with a note (then rebuilt)."""
    if not where.is_dir():
        return False
    try:
        meta = json.loads((where / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a mapping")
        if meta.get("version") != CACHE_VERSION or meta.get("feature_dtype") != feature_dtype:
            return False
        size, mtime, digest = int(meta["size"]), int(meta["mtime_ns"]), str(meta["sha256"])
        if not _well_formed(meta.get("files")):
            raise ValueError("no valid file listing")
    except (OSError, ValueError, KeyError, TypeError) as e:
        note(
            f"data cache damaged: {where / 'meta.json'} is missing or unreadable ({type(e).__name__}); "
            f"rebuilding it from {path}"
        )
        return False
    now = _stat(path)
    if size != now["size"]:
        return False
    if mtime == now["mtime_ns"]:
        return True
    if file_sha256(path) != digest:
        return False
    meta.update(now)  # same content under a new mtime: take the fast path next time
    try:  # atomic: a full disk must not leave half a meta.json (the cache would then be rebuilt)
        atomic_write_text(where / "meta.json", json.dumps(meta, indent=1))
    except OSError:  # a read-only cache or a full disk: the slow path again next time, nothing worse
        pass
    return True


class CacheDamaged(ValueError):
    """A cached file is missing, truncated or edited (its size or CRC-32 differs from what was written)."""


def note(message: str) -> None:
    """One line on stderr for something the kit repaired by itself (a damaged cache rebuilt)."""
    print(f"v3kit: note: {message}", file=sys.stderr, flush=True)


def file_crc32(path: Path, chunk: int = 1 << 23) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _listing(where: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """``{file: {"bytes", "crc32"}}`` of files just written to ``where``: stored beside them, checked on open."""
    return {n: {"bytes": (where / n).stat().st_size, "crc32": file_crc32(where / n)} for n in names}


def verify_files(where: Path, files: dict[str, dict[str, int]], verify: bool = True) -> None:
    """Raise :class:`CacheDamaged` naming the first listed file that is missing, of another size or (``verify``)
    of another CRC-32."""
    for name, want in files.items():
        p = where / name
        try:
            size = p.stat().st_size
        except OSError:
            raise CacheDamaged(f"{p} is missing") from None
        if size != want["bytes"]:
            raise CacheDamaged(f"{p} has {size} bytes, {want['bytes']} were written")
        if verify and file_crc32(p) != want["crc32"]:
            raise CacheDamaged(f"{p} was changed after it was written (checksum mismatch)")


def build_cache(path: str | Path, feature_dtype: str = "float32") -> Path:
    """Load ``path`` (validated), write its packed arrays to the cache directory and return that directory."""
    path = Path(path)
    data = load_groups(path)
    where = cache_dir(path, feature_dtype)
    where.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": CACHE_VERSION,
        "feature_dtype": feature_dtype,
        **_stat(path),
        "sha256": file_sha256(path),
        "groups": len(data),
        "group_size": data.group_size,
    }
    tmp = Path(_building_dir(where.parent))
    try:
        written = []
        for name in _FIELDS:
            t = getattr(data, name)
            if t is None:
                continue
            arr = to_feature_dtype(t, feature_dtype, name, path) if name in ("query_x", "cand_x") else t.numpy()
            np.save(tmp / f"{name}.npy", arr)
            written.append(f"{name}.npy")
        np.save(tmp / "query_ids.npy", np.asarray(data.query_ids, dtype=str))
        meta["files"] = _listing(tmp, written + ["query_ids.npy"])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, where)
    finally:
        _discard(tmp)
    return where


def open_cache(
    where: Path, prefix: str = "", files: dict[str, dict[str, int]] | None = None, verify: bool = True
) -> GroupData:
    """The cached arrays as a :class:`GroupData` over copy-on-write memory maps (values not re-validated).

    ``files`` (the listing written with them) is checked first (:func:`verify_files`; ``verify=False`` checks
    sizes only, for a cache this process just wrote); a file that is missing, damaged or unreadable raises
    :class:`CacheDamaged`."""
    if files is not None:
        if not _well_formed({n: f for n, f in files.items() if n.startswith(prefix)}, prefix):
            raise CacheDamaged(f"the file listing of {where} is incomplete")
        verify_files(where, {n: f for n, f in files.items() if n.startswith(prefix)}, verify)
    listed = (
        (lambda n: f"{prefix}{n}.npy" in files)
        if files is not None
        else (lambda n: (where / f"{prefix}{n}.npy").exists())
    )
    try:
        arrays = {n: np.load(where / f"{prefix}{n}.npy", mmap_mode="c") for n in _FIELDS if listed(n)}
        fields = {n: torch.from_numpy(a) for n, a in arrays.items()}
        fields["query_ids"] = np.load(where / f"{prefix}query_ids.npy").tolist()
        return GroupData(**fields, checks="none")  # validated when the cache was built; checking reads every page
    except (OSError, ValueError, TypeError, EOFError) as e:  # unlisted damage: a bad header, a missing array
        raise CacheDamaged(f"{where / prefix}*.npy cannot be opened ({type(e).__name__}: {str(e)[:120]})") from None


def _meta(where: Path) -> dict:
    try:
        meta = json.loads((where / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _without_cache(path: Path, where: Path, feature_dtype: str, e: OSError) -> GroupData:
    note(f"cannot write the data cache {where} ({e}); loading {path} without it")
    return load_groups(path, feature_dtype=feature_dtype)


def load_cached(path: str | Path, feature_dtype: str = "float32") -> GroupData:
    """:func:`~v3kit.data.tables.load_groups` through the cache: (re)build it when missing, stale or damaged (with a
    note), then memory-map it."""
    check_feature_dtype(feature_dtype)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    return _load_cached(path, feature_dtype, _valid(path, cache_dir(path, feature_dtype), feature_dtype))


def _load_cached(path: Path, feature_dtype: str, valid: bool) -> GroupData:
    where = cache_dir(path, feature_dtype)
    if valid:
        try:
            return open_cache(where, files=_meta(where).get("files", {}))
        except CacheDamaged as e:
            note(f"data cache damaged: {e}; rebuilding it from {path}")
    try:
        build_cache(path, feature_dtype)
    except OSError as e:  # e.g. a read-only data directory or a full disk: still load, just without the cache
        return _without_cache(path, where, feature_dtype, e)
    return open_cache(where, files=_meta(where).get("files", {}), verify=False)


def _split_listing(where: Path) -> dict[str, dict[str, int]] | None:
    """The file listing of a finished split (its ``done`` file), None when it is unfinished or unreadable."""
    try:
        done = json.loads((where / "done").read_text())
    except (OSError, ValueError):
        return None
    files = done.get("files") if isinstance(done, dict) else None
    return files if isinstance(files, dict) and files else None


def cached_splits(
    path: str | Path,
    feature_dtype: str = "float32",
    *,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    seed: int = 0,
    rows: int = 4096,
) -> Splits:
    """:func:`~v3kit.data.split_by_query` of the cached data, itself cached as memory-mapped arrays.

    ``split_by_query`` would gather every split into memory; here each split is gathered once, a few rows at a
    time, into ``.npy`` files beside the cache (removed with it when the data file changes), so training holds in
    memory only what its batches touch. Same rows, same order as ``split_by_query``. A finished split is opened
    without touching the packed arrays; a damaged one is rebuilt from them (with a note).
    """
    check_feature_dtype(feature_dtype)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    base = cache_dir(path, feature_dtype)
    where = base / f"split-seed{seed}-val{val_frac!r}-test{test_frac!r}"
    parts = ("train", "val", "test")
    valid = _valid(path, base, feature_dtype)
    listing = _split_listing(where) if valid else None
    if valid and listing is None and where.is_dir():
        note(f"data cache damaged: {where / 'done'} is missing or unreadable; rebuilding the split")
    if listing is not None:
        try:
            return Splits(**{part: open_cache(where, f"{part}_", listing) for part in parts})
        except CacheDamaged as e:
            note(f"data cache damaged: {e}; rebuilding the split from the packed arrays")
    data = _load_cached(path, feature_dtype, valid)
    if not base.is_dir():  # loaded without the cache (it could not be written): split in memory
        return split_by_query(data, val_frac=val_frac, test_frac=test_frac, seed=seed)
    index = dict(zip(parts, split_indices(len(data), val_frac=val_frac, test_frac=test_frac, seed=seed)))
    tmp = Path(_building_dir(where.parent))
    try:
        written = []
        for part, idx in index.items():
            idx = idx.numpy()
            for name in _FIELDS:
                t = getattr(data, name)
                if t is None:
                    continue
                src = t.numpy()
                out = _allocated_memmap(tmp / f"{part}_{name}.npy", src.dtype, (len(idx),) + src.shape[1:])
                for s in range(0, len(idx), rows):
                    out[s : s + rows] = src[idx[s : s + rows]]
                out.flush()
                del out
                written.append(f"{part}_{name}.npy")
            np.save(tmp / f"{part}_query_ids.npy", np.asarray(data.query_ids, dtype=str)[idx])
            written.append(f"{part}_query_ids.npy")
        listing = _listing(tmp, written)
        (tmp / "done").write_text(json.dumps({"files": listing}, indent=1))
        _publish(tmp, where)
    except OSError as e:  # a full disk: train on the in-memory split instead
        note(f"cannot write the split cache {where} ({e}); splitting {path} in memory")
        return split_by_query(data, val_frac=val_frac, test_frac=test_frac, seed=seed)
    finally:
        _discard(tmp)
    return Splits(**{part: open_cache(where, f"{part}_", listing, verify=False) for part in parts})


def _allocated_memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """``open_memmap`` for writing, with the file's blocks allocated before any page is touched: a store to a
    page a full disk cannot back kills the process with SIGBUS ("Bus error", exit 135), whereas allocating first
    raises ENOSPC as any write does (the caller then splits in memory and removes its build dir)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    start = path.stat().st_size - out.nbytes  # the header, written by open_memmap, stays as it is
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), start, out.nbytes)
            return out
        except AttributeError:  # no posix_fallocate (macOS, Windows): write the zeros through the file
            pass
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a filesystem without fallocate: write them
                raise
        f.seek(start)
        for done in range(0, out.nbytes, 1 << 20):
            f.write(bytes(min(1 << 20, out.nbytes - done)))
        f.flush()
    return out


def _building_dir(parent: Path) -> str:
    """A fresh ``.building-<pid>-*`` directory in ``parent``, after removing those of builders that died (a killed
    build leaves one; a live one, of another process sharing the cache, is left alone)."""
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(".building-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _publish(tmp: Path, where: Path) -> None:
    """Put a finished cache directory in place with one rename (readers see the old one or the new one)."""
    if where.exists():
        shutil.rmtree(where)
    os.replace(tmp, where)


def _discard(tmp: Path) -> None:
    """Remove what an interrupted build left behind."""
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
