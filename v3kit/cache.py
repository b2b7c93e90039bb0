"""A packed, memory-mapped cache of a long-form data file, so the second load is near-instant.

Layout, next to the data file: ``<file>.v3kit-cache/<feature_dtype>/`` holding one ``.npy`` per
:class:`~v3kit.data.GroupData` field (``query_x``, ``cand_x`` in ``feature_dtype``; ``mask``, ``labels``,
``rewards``, ``utility``; ``query_ids``) and ``meta.json``.

Key: ``meta.json`` records the data file's size, ``mtime_ns`` and SHA-256, the cache format version and the feature
dtype. A cache whose size and mtime match is used without reading the data file (fast path); when only the mtime
differs (a copy, a ``touch``), the file's SHA-256 decides, and a match refreshes the recorded mtime. Anything else
rebuilds the cache, which is written to a temporary directory and renamed into place (never half-written).

The arrays are opened with ``np.load(mmap_mode="c")`` (copy-on-write: writable, so ``torch.from_numpy`` accepts
them, yet nothing is read until touched and no write reaches the file): a load costs the page faults of what a
batch touches, not the size of the data. The data was validated when the cache was built, so it is not re-checked
(that would read every page).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .data import DataValidationError, GroupData, Splits, split_indices
from .rundir import file_sha256

CACHE_VERSION = 2  # 2: cand_ids
FEATURE_DTYPES = ("float32", "float16")
_FIELDS = ("query_x", "cand_x", "mask", "labels", "rewards", "utility", "cand_ids")


def cache_dir(path: str | Path, feature_dtype: str = "float32") -> Path:
    path = Path(path)
    return path.with_name(path.name + ".v3kit-cache") / feature_dtype


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _valid(path: Path, where: Path, feature_dtype: str) -> bool:
    try:
        meta = json.loads((where / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("version") != CACHE_VERSION or meta.get("feature_dtype") != feature_dtype:
        return False
    now = _stat(path)
    if meta["size"] != now["size"]:
        return False
    if meta["mtime_ns"] == now["mtime_ns"]:
        return True
    if file_sha256(path) != meta["sha256"]:
        return False
    meta.update(now)  # same content under a new mtime: take the fast path next time
    (where / "meta.json").write_text(json.dumps(meta, indent=1))
    return True


def to_feature_dtype(t: torch.Tensor, feature_dtype: str, name: str, path: str | Path, rows: int = 4096) -> np.ndarray:
    """``t`` as a numpy array of ``feature_dtype``; float16 overflow is refused (naming the field), not made inf."""
    out = t.numpy()
    if feature_dtype == "float32":
        return out
    half = np.empty(out.shape, dtype=np.float16)
    for s in range(0, out.shape[0], rows):  # a few rows at a time: no second full-size temporary
        with np.errstate(over="ignore"):
            half[s : s + rows] = out[s : s + rows]
        if not np.isfinite(half[s : s + rows]).all():
            raise DataValidationError(f"data file {path}: {name} has values beyond float16's range (|x| > 65504); "
                                      "set data.feature_dtype: float32")
    return half


def build_cache(path: str | Path, feature_dtype: str = "float32") -> Path:
    """Load ``path`` (validated), write its packed arrays to the cache directory and return that directory."""
    from .data import load_groups

    path = Path(path)
    data = load_groups(path)
    where = cache_dir(path, feature_dtype)
    where.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "feature_dtype": feature_dtype, **_stat(path), "sha256": file_sha256(path),
            "groups": len(data), "group_size": data.group_size}
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=where.parent))
    try:
        for name in _FIELDS:
            t = getattr(data, name)
            if t is None:
                continue
            arr = to_feature_dtype(t, feature_dtype, name, path) if name in ("query_x", "cand_x") else t.numpy()
            np.save(tmp / f"{name}.npy", arr)
        np.save(tmp / "query_ids.npy", np.asarray(data.query_ids, dtype=str))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, where)
    finally:
        _discard(tmp)
    return where


def open_cache(where: Path, prefix: str = "") -> GroupData:
    """The cached arrays as a :class:`GroupData` over copy-on-write memory maps (not re-validated)."""
    arrays = {n: np.load(where / f"{prefix}{n}.npy", mmap_mode="c") for n in _FIELDS
              if (where / f"{prefix}{n}.npy").exists()}
    fields = {n: torch.from_numpy(a) for n, a in arrays.items()}
    fields["query_ids"] = np.load(where / f"{prefix}query_ids.npy").tolist()
    return GroupData(**fields, checks="none")  # validated when the cache was built; checking reads every page


def load_cached(path: str | Path, feature_dtype: str = "float32") -> GroupData:
    """:func:`~v3kit.data.load_groups` through the cache: (re)build it when missing or stale, then memory-map it."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"data.feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    where = cache_dir(path, feature_dtype)
    if not _valid(path, where, feature_dtype):
        try:
            build_cache(path, feature_dtype)
        except OSError as e:  # e.g. a read-only data directory: still load, just without the cache
            warnings.warn(f"cannot write the data cache {where} ({e}); loading {path} without it", stacklevel=2)
            from .data import load_groups

            return load_groups(path, feature_dtype=feature_dtype)
    return open_cache(where)


def cached_splits(path: str | Path, feature_dtype: str = "float32", *, val_frac: float = 0.15,
                  test_frac: float = 0.15, seed: int = 0, rows: int = 4096) -> Splits:
    """:func:`~v3kit.data.split_by_query` of the cached data, itself cached as memory-mapped arrays.

    ``split_by_query`` would gather every split into memory; here each split is gathered once, a few rows at a
    time, into ``.npy`` files beside the cache (removed with it when the data file changes), so training holds in
    memory only what its batches touch. Same rows, same order as ``split_by_query``.
    """
    data = load_cached(path, feature_dtype)
    where = cache_dir(path, feature_dtype) / f"split-seed{seed}-val{val_frac!r}-test{test_frac!r}"
    parts = dict(zip(("train", "val", "test"),
                     split_indices(len(data), val_frac=val_frac, test_frac=test_frac, seed=seed)))
    if not (where / "done").exists():
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=where.parent))
        try:
            for part, idx in parts.items():
                idx = idx.numpy()
                for name in _FIELDS:
                    t = getattr(data, name)
                    if t is None:
                        continue
                    src = t.numpy()
                    out = np.lib.format.open_memmap(tmp / f"{part}_{name}.npy", mode="w+", dtype=src.dtype,
                                                    shape=(len(idx),) + src.shape[1:])
                    for s in range(0, len(idx), rows):
                        out[s : s + rows] = src[idx[s : s + rows]]
                    out.flush()
                    del out
                np.save(tmp / f"{part}_query_ids.npy", np.asarray(data.query_ids, dtype=str)[idx])
            (tmp / "done").write_text("")
            _publish(tmp, where)
        finally:
            _discard(tmp)
    return Splits(**{part: open_cache(where, f"{part}_") for part in parts})


def _publish(tmp: Path, where: Path) -> None:
    """Put a finished cache directory in place with one rename (readers see the old one or the new one)."""
    if where.exists():
        shutil.rmtree(where)
    os.replace(tmp, where)


def _discard(tmp: Path) -> None:
    """Remove what an interrupted build left behind."""
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
