"""The data contract: groups of (query, candidates) with a human label and a reward per candidate.

In memory a dataset is a :class:`GroupData` of padded tensors; on disk it is a long-form table (one row per
query-candidate pair) whose schema and per-row rules are here (:func:`from_long_frame` / :func:`to_long_frame`);
reading the Parquet, Arrow IPC / Feather v2 or JSONL files is :mod:`v3kit.data.tables`'s job. The schema is
documented in docs/data.md.
Queries and candidates come as feature vectors or as text (``query_text`` / ``candidate_text``); text is embedded
by a frozen encoder (the ``embed`` argument, see ``v3kit.data.text``) or carried to a text model
(``text_mode="end_to_end"``).

This module imports nothing else of the package: reading (:mod:`v3kit.data.tables`), fast packing
(:mod:`v3kit.data.ingest`), the packed cache (:mod:`v3kit.data.cache`) and the shared candidates' table
(:mod:`v3kit.data.shared_candidates`) all build on it.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

# Features beyond this magnitude are almost surely a unit or parsing error (and overflow float32 once squared in a
# norm); real embeddings and standardised features sit many orders of magnitude below it.
MAX_FEATURE_ABS = 1e6
# Rewards (and utilities) beyond this magnitude are refused at load: below it every computation on raw rewards stays
# finite in float32 (3.4e38): a group's sum (groups hold <= 1e5 candidates), a reward over the smallest temperature
# a config may set (1e-6), and the group statistics, which are taken at unit scale when the squares would overflow.
MAX_REWARD_ABS = 1e30

REQUIRED_COLUMNS = ("query_id", "candidate_id", "reward", "is_label")
# Each side (query, candidate) needs its feature vector, its text, or both; text is embedded (frozen mode) or fed
# to a text model per batch (end-to-end mode).
SIDE_COLUMNS = {"query": ("query_features", "query_text"), "candidate": ("candidate_features", "candidate_text")}
OPTIONAL_COLUMNS = ("utility",)
TEXT_MODES = ("frozen", "end_to_end")
# How the query/candidate features are stored in memory and in the cache (data.feature_dtype); batches are float32.
FEATURE_DTYPES = ("float32", "float16")

# Embeds distinct texts: list of N strings -> float array [N, D] (see v3kit.data.text.embed_texts).
Embedder = Callable[[list[str]], np.ndarray]
FEATURE_COLUMNS = ("query_features", "candidate_features")  # list-valued; packed by v3kit.data.ingest


CHECK_LEVELS = ("all", "no_feature_scan", "none")  # see GroupData.checks


class DataValidationError(ValueError):
    """Input data breaks the contract; the message names the row/field and the fix."""


@dataclass
class GroupData:
    """Padded groups. ``cand_x[b, c]`` is candidate ``c`` of query ``b``; ``mask`` marks real candidates.

    ``utility`` is the hidden true utility (synthetic world only; ``None`` for real data). ``query_text`` /
    ``cand_text`` are the raw texts when the table had text columns (``""`` at padding), for text models.
    """

    query_x: Tensor  # [N, Dq] float
    cand_x: Tensor  # [N, G, Dc] float
    mask: Tensor  # [N, G] bool
    labels: Tensor  # [N] long, index of the human-labelled candidate
    rewards: Tensor  # [N, G] float, 0 at padding
    query_ids: list[str]
    utility: Tensor | None = None  # [N, G] float
    query_text: list[str] | None = None  # [N]
    cand_text: list[list[str]] | None = None  # [N][G], "" at padding
    # [N, G] long: the table's candidate_id as a code shared by every row with the same id (-1 at padding), so a
    # candidate that recurs across queries can be recognised (reward de-biasing by a per-candidate prior).
    cand_ids: Tensor | None = None
    # The distinct candidates' features and each slot's row among them, when candidates recur across groups: a
    # v3kit.data.shared_candidates.CandidateTable (the run config's candidate_table), which batches then carry.
    cand_table: Any = None
    # How much of validate_tensors runs (not stored): "all"; "no_feature_scan" for a loader that has just checked
    # every feature value it wrote (v3kit.data.ingest), so only the NaN/inf scan of the features is skipped; "none" for
    # the packed cache, validated when it was built (checking would read every memory-mapped page).
    checks: InitVar[str] = "all"

    def __post_init__(self, checks: str) -> None:
        if checks not in CHECK_LEVELS:
            raise ValueError(f"GroupData checks must be one of {CHECK_LEVELS}, got {checks!r}")
        if checks != "none":
            validate_tensors(self, features=checks == "all")

    def __len__(self) -> int:
        return self.query_x.shape[0]

    @property
    def group_size(self) -> int:
        return self.cand_x.shape[1]

    @property
    def query_dim(self) -> int:
        return self.query_x.shape[1]

    @property
    def cand_dim(self) -> int:
        return self.cand_x.shape[2]

    def subset(self, index: Sequence[int] | Tensor) -> "GroupData":
        idx = torch.as_tensor(index, dtype=torch.long)
        return GroupData(
            query_x=self.query_x[idx],
            cand_x=self.cand_x[idx],
            mask=self.mask[idx],
            labels=self.labels[idx],
            rewards=self.rewards[idx],
            query_ids=[self.query_ids[i] for i in idx.tolist()],
            utility=None if self.utility is None else self.utility[idx],
            query_text=_take(self.query_text, idx),
            cand_text=_take(self.cand_text, idx),
            cand_ids=None if self.cand_ids is None else self.cand_ids[idx],
            cand_table=None if self.cand_table is None else self.cand_table.subset(idx),
        )

    def with_rewards(self, rewards: Tensor) -> "GroupData":
        """The same groups with other rewards (0 at padding), e.g. de-biased ones; nothing else is copied."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["rewards"] = torch.where(
            self.mask, rewards.to(self.rewards.dtype), torch.zeros((), dtype=self.rewards.dtype)
        )
        return GroupData(**out, checks="none")

    def to(self, device: torch.device | str) -> "GroupData":
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in out.items():
            if isinstance(v, Tensor) or (k == "cand_table" and v is not None):
                out[k] = v.to(device)
        return GroupData(**out)


@dataclass
class Batch:
    """A mini-batch of groups plus their row indices in the parent dataset (to look up ``old_log_probs``)."""

    index: Tensor
    query_x: Tensor
    cand_x: Tensor
    mask: Tensor
    labels: Tensor
    rewards: Tensor
    utility: Tensor | None
    query_text: list[str] | None = None
    cand_text: list[list[str]] | None = None
    # the candidates as rows of the data's cand_table (a v3kit.data.shared_candidates.SharedCandidates), when it
    # has one and it pays at this batch size
    shared: Any = None


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]`` for an index tensor of any shape (rows along dim 0), in ``x``'s dtype. ``index_select`` copies each
    row whole; advanced indexing copied a batch of 384-d groups 4-5x slower (the same values)."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """:func:`gather_rows` as float32: the features of a batch. Features may be stored as float16
    (``data.feature_dtype``); models always see float32."""
    return gather_rows(x, idx).float()


def _take(items: list | None, idx: Tensor) -> list | None:
    return None if items is None else [items[i] for i in idx.tolist()]


def iterate_batches(
    data: GroupData,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    rows: slice | None = None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects; with ``shuffle`` the order comes from ``generator`` (seeded by the caller).
    ``rows``: only these groups, in order (a rank's share under torchrun; not with ``shuffle``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data)
    if rows is not None and shuffle:
        raise ValueError("iterate_batches: rows= selects groups in order; it cannot be combined with shuffle")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if rows is not None:
        order = order[rows]
        n = len(order)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield Batch(
            index=idx,
            # Gathering copies, so a batch of a memory-mapped dataset is an ordinary tensor.
            query_x=take_rows(data.query_x, idx),
            cand_x=take_rows(data.cand_x, idx),
            mask=data.mask[idx],
            labels=data.labels[idx],
            rewards=data.rewards[idx],
            utility=None if data.utility is None else data.utility[idx],
            query_text=_take(data.query_text, idx),
            cand_text=_take(data.cand_text, idx),
            shared=None if data.cand_table is None else data.cand_table.batch(idx),
        )


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


# ----------------------------------------------------------------------------------------------- validation
def _fail(msg: str) -> None:
    raise DataValidationError(msg)


def _nonfinite(t: Tensor, elements: int = 1 << 22) -> Tensor:
    """Where ``t`` is NaN/inf (for a 3-d tensor: any over the last dim), a block of rows at a time.

    A block whose min and max are finite has no NaN/inf (NaN propagates through both), so the usual all-finite
    tensor costs one read and no temporaries; ``isfinite`` of a whole feature tensor would allocate several times
    its size (torch computes it through ``abs``). Only a block that fails is examined element by element.
    """

    def exact(block: Tensor) -> Tensor:
        return ~torch.isfinite(block) if block.dim() < 3 else ~torch.isfinite(block).all(dim=-1)

    def clean(block: Tensor) -> bool:
        if block.numel() == 0:
            return True
        lo, hi = torch.aminmax(block)
        return bool(torch.isfinite(lo) and torch.isfinite(hi))

    if t.dim() < 3:
        return torch.zeros(t.shape, dtype=torch.bool) if clean(t) else exact(t)
    rows = max(1, elements // max(1, t.shape[1] * t.shape[2]))
    parts = [
        torch.zeros(block.shape[:2], dtype=torch.bool) if clean(block) else exact(block)
        for block in (t[s : s + rows] for s in range(0, t.shape[0], rows))
    ]
    return torch.cat(parts) if parts else torch.zeros(t.shape[:2], dtype=torch.bool)


def validate_tensors(d: GroupData, *, features: bool = True) -> None:
    """Check shapes and values of an in-memory dataset; raise :class:`DataValidationError` naming the field.
    ``features=False`` skips the NaN/inf scan of ``query_x`` / ``cand_x`` (for a loader that has just checked
    every value it wrote)."""
    n = d.query_x.shape[0] if d.query_x.dim() == 2 else -1
    if d.query_x.dim() != 2:
        _fail(f"query_x must be [N, Dq], got shape {tuple(d.query_x.shape)}")
    if d.cand_x.dim() != 3 or d.cand_x.shape[0] != n:
        _fail(f"cand_x must be [N, G, Dc] with N={n}, got shape {tuple(d.cand_x.shape)}")
    g = d.cand_x.shape[1]
    for name in ("mask", "rewards") + (("utility",) if d.utility is not None else ()):
        t = getattr(d, name)
        if tuple(t.shape) != (n, g):
            _fail(f"{name} must be [N, G] = {(n, g)}, got shape {tuple(t.shape)}")
    if tuple(d.labels.shape) != (n,):
        _fail(f"labels must be [N] = ({n},), got shape {tuple(d.labels.shape)}")
    if len(d.query_ids) != n:
        _fail(f"query_ids has {len(d.query_ids)} entries for {n} groups")
    if d.cand_ids is not None and (tuple(d.cand_ids.shape) != (n, g) or d.cand_ids.dtype != torch.long):
        _fail(f"cand_ids must be a long tensor [N, G] = {(n, g)}, got {d.cand_ids.dtype} {tuple(d.cand_ids.shape)}")
    if d.query_text is not None and len(d.query_text) != n:
        _fail(f"query_text has {len(d.query_text)} entries for {n} groups")
    if d.cand_text is not None and (len(d.cand_text) != n or any(len(t) != g for t in d.cand_text)):
        _fail(f'cand_text must be {n} lists of {g} strings ("" at padding)')
    if d.mask.dtype != torch.bool:
        _fail(f"mask must be a bool tensor, got {d.mask.dtype}")
    for name in ("query_x", "cand_x", "rewards") + (("utility",) if d.utility is not None else ()):
        t = getattr(d, name)
        if not torch.is_floating_point(t):
            _fail(f"{name} must be a float tensor, got {t.dtype}")
        if not features and name in ("query_x", "cand_x"):
            continue
        bad = _nonfinite(t)
        if name in ("cand_x",):
            bad = bad & d.mask
        elif name in ("rewards", "utility"):
            bad = bad & d.mask
        if bad.any():
            row = bad.nonzero()[0].tolist()
            _fail(f"{name} has a NaN/inf value at index {row}; clean or drop that query before training")
        if name in ("rewards", "utility"):
            huge = (t.abs() > MAX_REWARD_ABS) & d.mask
            if huge.any():
                row = huge.nonzero()[0].tolist()
                _fail(
                    f"{name} has {float(t[tuple(row)]):g} at index {row}, beyond |{name}| <= {MAX_REWARD_ABS:g}; "
                    "rescale it (e.g. to standard units)"
                )
    n_valid = d.mask.sum(dim=1)
    if (n_valid < 2).any():
        row = int((n_valid < 2).nonzero()[0])
        _fail(
            f"group {row} (query_id={d.query_ids[row]!r}) has {int(n_valid[row])} candidate(s); "
            "a group needs at least 2 candidates to rank — drop it"
        )
    if ((d.labels < 0) | (d.labels >= g)).any():
        row = int(((d.labels < 0) | (d.labels >= g)).nonzero()[0])
        _fail(f"labels[{row}] = {int(d.labels[row])} is outside the group (0..{g - 1})")
    on_pad = ~d.mask.gather(1, d.labels.long().unsqueeze(1)).squeeze(1)
    if on_pad.any():
        row = int(on_pad.nonzero()[0])
        _fail(
            f"labels[{row}] (query_id={d.query_ids[row]!r}) points at masked candidate {int(d.labels[row])}; "
            "the label must be one of the group's real candidates"
        )


def check_feature_dtype(feature_dtype: str) -> None:
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"data.feature_dtype must be {' or '.join(map(repr, FEATURE_DTYPES))}, got {feature_dtype!r}")


def to_feature_dtype(t: Tensor, feature_dtype: str, name: str, path: str | Path, rows: int = 4096) -> np.ndarray:
    """``t`` as a numpy array of ``feature_dtype``; float16 overflow is refused (naming the field), not made inf."""
    out = t.numpy()
    if feature_dtype == "float32":
        return out
    half = np.empty(out.shape, dtype=np.float16)
    for s in range(0, out.shape[0], rows):  # a few rows at a time: no second full-size temporary
        with np.errstate(over="ignore"):
            half[s : s + rows] = out[s : s + rows]
        if not np.isfinite(half[s : s + rows]).all():
            raise DataValidationError(
                f"data file {path}: {name} has values beyond float16's range (|x| > 65504); "
                "set data.feature_dtype: float32"
            )
    return half


@dataclass
class Splits:
    train: GroupData
    val: GroupData
    test: GroupData


def split_indices(
    n: int, *, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(train, val, test) row indices of :func:`split_by_query` for ``n`` queries."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum to < 1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(round(n * val_frac)), int(round(n * test_frac))
    if n - n_val - n_test < 1 or (val_frac > 0 and n_val < 1) or (test_frac > 0 and n_test < 1):
        raise DataValidationError(f"{n} queries are too few to split with val_frac={val_frac}, test_frac={test_frac}")
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def split_by_query(data: GroupData, *, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0) -> Splits:
    """Random split by query (a query's candidates never straddle splits)."""
    train, val, test = split_indices(len(data), val_frac=val_frac, test_frac=test_frac, seed=seed)
    return Splits(train=data.subset(train), val=data.subset(val), test=data.subset(test))
