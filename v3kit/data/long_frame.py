"""The long-form table (one row per query-candidate pair) <-> :class:`~v3kit.data.contract.GroupData`: the table's
checks (required columns, ids, labels, one query vector), their one-line messages, and the conversion both ways
(text columns embedded by a frozen encoder, or carried to a text model). The fast packing of big feature tables is
:mod:`v3kit.data.ingest`, which raises through the same checks."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .contract import (
    MAX_FEATURE_ABS,
    MAX_REWARD_ABS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SIDE_COLUMNS,
    TEXT_MODES,
    DataValidationError,
    Embedder,
    GroupData,
)


def _fail(msg: str) -> None:
    raise DataValidationError(msg)


def as_matrix(col: pd.Series, field: str, df: pd.DataFrame) -> np.ndarray:
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


def as_bool(col: pd.Series, df: pd.DataFrame) -> np.ndarray:
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
        huge = np.abs(vals) > MAX_REWARD_ABS
        if huge.any():
            i = int(np.flatnonzero(huge)[0])
            _fail(
                f"row {i} (query_id={df['query_id'].iloc[i]!r}): {field} = {vals[i]:g} exceeds "
                f"|{field}| <= {MAX_REWARD_ABS:g}; rescale the {field} column (e.g. to standard units)"
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
        feats[side] = as_matrix(df[feat_col], feat_col, df) if feat_col in df.columns else None
    is_label = as_bool(df["is_label"], df)

    qids = df["query_id"].astype(str).to_numpy()
    codes, order = pd.factorize(qids)  # queries in first-seen order
    by_code = pd.Series(np.arange(len(df))).groupby(codes).indices
    groups = {qid: by_code[k] for k, qid in enumerate(order)}
    _check_groups(groups, is_label, feats["query"], texts["query"])  # before the (possibly slow) embedding
    _fill_features(feats, texts, len(df), embed, text_mode)
    return _pack(df, list(order), groups, feats, texts, is_label)


def _check_groups(
    groups: dict[str, np.ndarray], is_label: np.ndarray, q_feat: np.ndarray | None, q_text: np.ndarray | None
) -> None:
    """Every group: enough candidates, exactly one label, one feature vector and one text per query."""
    for qid, rows in groups.items():
        check_group(
            qid,
            len(rows),
            int(is_label[rows].sum()),
            q_feat is not None and not np.allclose(q_feat[rows], q_feat[rows[0]]),
        )
        if q_text is not None and (q_text[rows] != q_text[rows[0]]).any():
            i = int(rows[np.flatnonzero(q_text[rows] != q_text[rows[0]])[0]])
            _fail(
                f"row {i} (query_id={qid!r}): query_text differs from the query's first row; a query has one "
                "text (give the rows the same text or a different query_id)"
            )


def _fill_features(
    feats: dict[str, np.ndarray | None],
    texts: dict[str, np.ndarray | None],
    n_rows: int,
    embed: Embedder | None,
    text_mode: str,
) -> None:
    """The features of the sides given only as text: embedded (``frozen``), or zero-width (``end_to_end``)."""
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
            feats[side] = np.zeros((n_rows, 0))


def _pack(
    df: pd.DataFrame,
    order: list[str],
    groups: dict[str, np.ndarray],
    feats: dict[str, np.ndarray | None],
    texts: dict[str, np.ndarray | None],
    is_label: np.ndarray,
) -> GroupData:
    """The rows of each group, padded to the largest group, as :class:`GroupData`."""
    q, c, c_text, q_text = feats["query"], feats["candidate"], texts["candidate"], texts["query"]
    n, g_max = len(order), max(len(r) for r in groups.values())
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
