"""The data contract: groups of (query, candidates) with a human label and a reward per candidate.

In memory a dataset is a :class:`GroupData` of padded tensors; on disk it is a long-form table (one row per
query-candidate pair) whose schema and per-row rules are here (:func:`from_long_frame` / :func:`to_long_frame`);
reading the Parquet, Arrow IPC / Feather v2 or JSONL files is :mod:`v3kit.data.tables`'s job. See the README's
"Data schema" section.
Queries and candidates come as feature vectors or as text (``query_text`` / ``candidate_text``); text is embedded
by a frozen encoder (the ``embed`` argument, see ``v3kit.data.text``) or carried to a text model
(``text_mode="end_to_end"``).

This module imports nothing else of the package: reading (:mod:`v3kit.data.tables`), fast packing
(:mod:`v3kit.data.ingest`) and the packed cache (:mod:`v3kit.data.cache`) all build on it.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

# Features beyond this magnitude are almost surely a unit or parsing error (and overflow float32 once squared in a
# norm); real embeddings and standardised features sit many orders of magnitude below it.
MAX_FEATURE_ABS = 1e6

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
            if isinstance(v, Tensor):
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
            # Features may be stored as float16 (data.feature_dtype); models always see float32. Gathering copies,
            # so a batch of a memory-mapped dataset is an ordinary tensor.
            query_x=data.query_x[idx].float(),
            cand_x=data.cand_x[idx].float(),
            mask=data.mask[idx],
            labels=data.labels[idx],
            rewards=data.rewards[idx],
            utility=None if data.utility is None else data.utility[idx],
            query_text=_take(data.query_text, idx),
            cand_text=_take(data.cand_text, idx),
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


# ----------------------------------------------------------------------------------------------- long-form tables
def _as_matrix(col: pd.Series, field: str, df: pd.DataFrame) -> np.ndarray:
    lengths = col.map(lambda v: len(v) if hasattr(v, "__len__") and not isinstance(v, str) else -1)
    if (lengths < 0).any():
        i = int(np.flatnonzero(lengths.to_numpy() < 0)[0])
        _fail(f"row {df.index[i]}: {field} must be a list of floats, got {col.iloc[i]!r}")
    if lengths.nunique() > 1:
        common = int(lengths.mode().iloc[0])
        i = int(np.flatnonzero(lengths.to_numpy() != common)[0])
        _fail(
            f"row {df.index[i]} (query_id={df['query_id'].iloc[i]!r}): {field} has length {int(lengths.iloc[i])} "
            f"but most rows have {common}; every {field} vector must have the same dimension"
        )
    if (lengths == 0).any():
        i = int(np.flatnonzero(lengths.to_numpy() == 0)[0])
        _fail(
            f"row {df.index[i]} (query_id={df['query_id'].iloc[i]!r}): {field} is empty; it needs at least one feature"
        )
    try:
        mat = np.asarray(col.tolist(), dtype=np.float64)
    except (TypeError, ValueError):
        i = next(i for i, v in enumerate(col) if not all(isinstance(x, (int, float, np.number)) for x in v))
        _fail(
            f"row {df.index[i]} (query_id={df['query_id'].iloc[i]!r}): {field} must hold numbers, got "
            f"{list(col.iloc[i])[:4]!r}"
        )
    bad = ~np.isfinite(mat).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(f"row {df.index[i]} (query_id={df['query_id'].iloc[i]!r}): {field} contains NaN/inf; clean or drop it")
    huge = (np.abs(mat) > MAX_FEATURE_ABS).any(axis=1)
    if huge.any():
        i = int(np.flatnonzero(huge)[0])
        j = int(np.flatnonzero(np.abs(mat[i]) > MAX_FEATURE_ABS)[0])
        _fail(
            f"row {df.index[i]} (query_id={df['query_id'].iloc[i]!r}): {field}[{j}] = {mat[i, j]:g} exceeds "
            f"|x| <= {MAX_FEATURE_ABS:g}; rescale (e.g. standardise) the features"
        )
    return mat


def _check_ids(df: pd.DataFrame) -> None:
    """Null ids would become the string 'None' (one bogus query); a repeated (query, candidate) pair would count one
    candidate twice, possibly with two different rewards."""
    for col in ("query_id", "candidate_id"):
        null = df[col].isna().to_numpy()
        if null.any():
            i = int(np.flatnonzero(null)[0])
            _fail(f"row {i}: {col} is null; every row needs a {col} (drop the row or fill it in)")
    key = df[["query_id", "candidate_id"]].astype(str)
    dup = key.duplicated(keep=False).to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        q, c = key.iloc[i]
        rows = np.flatnonzero(dup & (key["query_id"] == q).to_numpy() & (key["candidate_id"] == c).to_numpy())
        rewards = df["reward"].iloc[rows].tolist()
        _fail(
            f"query_id={q!r}, candidate_id={c!r} appears in rows {rows.tolist()} (rewards {rewards}); each "
            "candidate may appear once per query: drop the duplicate rows"
        )


def _as_bool(col: pd.Series, df: pd.DataFrame) -> np.ndarray:
    """``is_label`` as booleans; strings like "false" would all be truthy, so only bools and 0/1 are accepted."""
    ok = col.map(lambda v: isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)))
    if not ok.all():
        i = int(np.flatnonzero(~ok.to_numpy())[0])
        _fail(
            f"row {i} (query_id={df['query_id'].iloc[i]!r}): is_label is {col.iloc[i]!r}; it must be true/false "
            "(or 1/0), not a string or null"
        )
    return col.astype(bool).to_numpy()


def _as_texts(col: pd.Series, field: str, df: pd.DataFrame) -> np.ndarray:
    """A text column as an object array of non-empty strings; null, non-string or blank text names its row."""
    ok = col.map(lambda v: isinstance(v, str) and v.strip() != "")
    if not ok.all():
        i = int(np.flatnonzero(~ok.to_numpy())[0])
        v = col.iloc[i]
        what = "null" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(v)
        _fail(
            f"row {i} (query_id={df['query_id'].iloc[i]!r}): {field} is {what}; every {field} must be a "
            "non-empty string (fill it in or drop the row)"
        )
    return col.to_numpy(dtype=object)


def _embed_distinct(texts: list[np.ndarray], embed: Embedder) -> list[np.ndarray]:
    """Embed every distinct text once (sorted, so the encoder sees the same batches on every run)."""
    distinct = sorted(set().union(*(set(t.tolist()) for t in texts)))
    vecs = np.asarray(embed(distinct), dtype=np.float64)
    if vecs.ndim != 2 or vecs.shape[0] != len(distinct) or not np.isfinite(vecs).all():
        _fail(
            f"the text encoder returned an array of shape {vecs.shape} (or NaN/inf) for {len(distinct)} texts; "
            "it must return one finite vector per text"
        )
    where = {t: i for i, t in enumerate(distinct)}
    return [vecs[[where[x] for x in t]] for t in texts]


def check_long_frame(df: pd.DataFrame, columns: Sequence[str], n_rows: int) -> None:
    """The table-level checks on ``df``'s scalar columns (``columns``: every column of the table, also list-valued
    ones ``df`` may not hold): required columns, emptiness, ids, finite rewards."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    missing += [" or ".join(cols) for cols in SIDE_COLUMNS.values() if not any(c in columns for c in cols)]
    if missing:
        _fail(
            f"missing column(s) {missing}; a long-form table needs {list(REQUIRED_COLUMNS)} plus query_features "
            f"and/or query_text, candidate_features and/or candidate_text (optional: {list(OPTIONAL_COLUMNS)}); "
            f"found {list(columns)}"
        )
    if n_rows == 0:
        _fail("the data table is empty")
    _check_ids(df)
    for field in ("reward",) + (("utility",) if "utility" in columns else ()):
        vals = pd.to_numeric(df[field], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(vals)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            _fail(
                f"row {i} (query_id={df['query_id'].iloc[i]!r}): {field} is {df[field].iloc[i]}; "
                f"every {field} must be a finite number"
            )


def check_group(qid: str, n_rows: int, n_labels: int, query_features_differ: bool) -> None:
    """The rules one query's rows must meet, in the order they are reported (the frame loop and the vectorised
    packing of :mod:`v3kit.data.ingest` both raise through here): at least 2 candidates, exactly one label, one query
    feature vector."""
    if n_rows < 2:
        _fail(f"query_id={qid!r} has {n_rows} candidate row(s); a group needs at least 2 candidates — drop it")
    if n_labels != 1:
        what = "no candidate" if n_labels == 0 else f"{n_labels} candidates"
        _fail(f"query_id={qid!r} has {what} with is_label=true; mark exactly one candidate per query as the label")
    if query_features_differ:
        _fail(f"query_id={qid!r}: query_features differ between its rows; a query has one feature vector")


def from_long_frame(df: pd.DataFrame, *, embed: Embedder | None = None, text_mode: str = "frozen") -> GroupData:
    """Build padded groups from a long-form frame (one row per query-candidate); validate on the way.

    A side given only as text (``query_text`` / ``candidate_text``) gets its features from ``embed`` (called
    once with every distinct text) in ``text_mode="frozen"``; in ``"end_to_end"`` it gets zero-width features
    and the texts travel in :attr:`GroupData.query_text` / :attr:`GroupData.cand_text` for a text model.
    Feature-only Parquet files take the streamed, vectorised path of :func:`v3kit.data.tables.load_groups` instead.
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    df = df.reset_index(drop=True)
    check_long_frame(df, list(df.columns), len(df))
    feats: dict[str, np.ndarray | None] = {}
    texts: dict[str, np.ndarray | None] = {}
    for side, (feat_col, text_col) in SIDE_COLUMNS.items():
        texts[side] = _as_texts(df[text_col], text_col, df) if text_col in df.columns else None
        feats[side] = _as_matrix(df[feat_col], feat_col, df) if feat_col in df.columns else None
    q_text, c_text = texts["query"], texts["candidate"]
    is_label = _as_bool(df["is_label"], df)

    qids = df["query_id"].astype(str).to_numpy()
    codes, order = pd.factorize(qids)  # queries in first-seen order
    by_code = pd.Series(np.arange(len(df))).groupby(codes).indices
    groups = {qid: by_code[k] for k, qid in enumerate(order)}
    g_max = max(len(r) for r in groups.values())
    n = len(order)
    for qid in order:  # validate every group before the (possibly slow) embedding
        rows = groups[qid]
        check_group(
            qid,
            len(rows),
            int(is_label[rows].sum()),
            feats["query"] is not None and not np.allclose(feats["query"][rows], feats["query"][rows[0]]),
        )
        if q_text is not None and (q_text[rows] != q_text[rows[0]]).any():
            i = int(rows[np.flatnonzero(q_text[rows] != q_text[rows[0]])[0]])
            _fail(
                f"row {i} (query_id={qid!r}): query_text differs from the query's first row; a query has one "
                "text (give the rows the same text or a different query_id)"
            )
    to_embed = [side for side in SIDE_COLUMNS if feats[side] is None]
    if to_embed and text_mode == "frozen":
        if embed is None:
            _fail(
                f"{[SIDE_COLUMNS[s][1] for s in to_embed]} without feature vectors need a text encoder; load the "
                "table through v3kit.pipeline.prepare_data (data.text_encoder) or pass embed="
            )
        for side, mat in zip(to_embed, _embed_distinct([texts[s] for s in to_embed], embed)):
            feats[side] = mat
    for side in to_embed:
        if feats[side] is None:  # end_to_end: a text model reads the texts, there are no features
            feats[side] = np.zeros((len(df), 0))
    q, c = feats["query"], feats["candidate"]
    query_x = np.zeros((n, q.shape[1]))
    cand_x = np.zeros((n, g_max, c.shape[1]))
    mask = np.zeros((n, g_max), dtype=bool)
    rewards = np.zeros((n, g_max))
    utility = np.zeros((n, g_max)) if "utility" in df.columns else None
    labels = np.zeros(n, dtype=np.int64)
    cand_text = [[""] * g_max for _ in range(n)] if c_text is not None else None
    cand_codes = pd.factorize(df["candidate_id"].astype(str))[0]
    cand_ids = np.full((n, g_max), -1, dtype=np.int64)
    reward_col = df["reward"].to_numpy(dtype=np.float64)
    util_col = df["utility"].to_numpy(dtype=np.float64) if utility is not None else None
    for b, qid in enumerate(order):
        rows = groups[qid]
        k = len(rows)
        query_x[b] = q[rows[0]]
        cand_x[b, :k] = c[rows]
        mask[b, :k] = True
        rewards[b, :k] = reward_col[rows]
        cand_ids[b, :k] = cand_codes[rows]
        labels[b] = int(np.flatnonzero(is_label[rows])[0])
        if utility is not None:
            utility[b, :k] = util_col[rows]
        if c_text is not None:
            cand_text[b][:k] = c_text[rows].tolist()
    return GroupData(
        query_x=torch.tensor(query_x, dtype=torch.float32),
        cand_x=torch.tensor(cand_x, dtype=torch.float32),
        mask=torch.tensor(mask),
        labels=torch.tensor(labels),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        query_ids=[str(x) for x in order],
        utility=None if utility is None else torch.tensor(utility, dtype=torch.float32),
        query_text=None if q_text is None else [str(q_text[groups[qid][0]]) for qid in order],
        cand_text=cand_text,
        cand_ids=torch.from_numpy(cand_ids),
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


def to_long_frame(data: GroupData) -> pd.DataFrame:
    """Inverse of :func:`from_long_frame` (used to export the synthetic world and in tests)."""
    rows = []
    for b in range(len(data)):
        for c in torch.nonzero(data.mask[b]).flatten().tolist():
            row = {
                "query_id": data.query_ids[b],
                "candidate_id": (
                    f"{data.query_ids[b]}/{c}" if data.cand_ids is None else f"c{int(data.cand_ids[b, c])}"
                ),
                "query_features": data.query_x[b].tolist(),
                "candidate_features": data.cand_x[b, c].tolist(),
                "reward": float(data.rewards[b, c]),
                "is_label": bool(data.labels[b] == c),
            }
            if data.utility is not None:
                row["utility"] = float(data.utility[b, c])
            if data.query_text is not None:
                row["query_text"] = data.query_text[b]
            if data.cand_text is not None:
                row["candidate_text"] = data.cand_text[b][c]
            rows.append(row)
    return pd.DataFrame(rows)


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
