"""Candidates shared across groups: the distinct candidates' features once, and each slot's row among them.

Why: on a routing-style task (queries sent to a fixed set of tools, modules or intents) every group draws from the
same few candidates. module_routing, for one, has 59 distinct candidates in 19,200 slots. A towers model then
embeds the same candidates again in every group of a batch. With the table its candidate tower runs once per
distinct candidate and the slots gather their rows, which divides the candidate tower's arithmetic by the batch's
slots per distinct candidate.

The scores are the same up to float rounding: a matmul may block other row counts differently, and a repeated
candidate's gradient is summed over its slots before it reaches the weights instead of inside the weight gradient's
matmul. So the switch (``candidate_table`` in the run config: ``auto``, ``true``, ``false``) says how fast a run
computes, not what it trains, as ``threads`` does.

The table is only built from the data's candidate ids (``GroupData.cand_ids``: tables read from a file) and only
kept when every slot's features equal its row's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .contract import GroupData, gather_rows

MODES = ("auto", True, False)  # the run config's candidate_table (YAML's on/off read as true/false)
# A table is kept when the candidates recur at least this often on average (slots per distinct candidate): below
# that no batch has twice as many slots as the table has rows (pays) unless it holds most of the data.
MIN_REPEATS = 4
# The most groups any batch of a run holds by default: compute_log_probs's batches (old_log_probs, evaluations). A
# table too large to pay even there is not built, so a large catalogue costs no pass over its features.
LARGEST_BATCH = 1024
# Verify the features in chunks of this many groups (a memory-mapped table is read once, a bounded part at a time).
_CHUNK = 4096


@dataclass(frozen=True)
class CandidateTable:
    """The distinct candidates of a dataset. ``features[rows[b, c]]`` equals ``cand_x[b, c]`` bit for bit (padding
    slots included: they share one row)."""

    features: Tensor  # [U, Dc], the dtype cand_x is stored in
    rows: Tensor  # [N, G] long
    any_model: bool = False  # candidate_table: true (any towers model); auto: the built-in TwoTower only

    def subset(self, idx: Tensor) -> CandidateTable:
        return CandidateTable(self.features, self.rows[idx], self.any_model)

    def to(self, device: torch.device | str) -> CandidateTable:
        return CandidateTable(self.features.to(device), self.rows.to(device), self.any_model)

    def batch(self, idx: Tensor) -> SharedCandidates | None:
        """The candidates of the groups ``idx`` (any shape) as table rows, or None when the table does not pay for a
        batch of that size (:func:`pays`)."""
        slots = idx.numel() * self.rows.shape[1]
        if not pays(len(self.features), slots):
            return None
        return SharedCandidates(self.features.float(), gather_rows(self.rows, idx), self.any_model)


def pays(table_rows: int, slots: int) -> bool:
    """Whether running the candidate tower over the whole table is worth it for a batch of ``slots`` candidates:
    at least twice as many slots as rows, so the tower's arithmetic at least halves."""
    return slots >= 2 * table_rows


@dataclass(frozen=True)
class SharedCandidates:
    """A batch's candidates as rows of a table: what ``model_inputs`` gives a towers model in place of its
    ``cand_x [B, G, Dc]`` (``scores`` embeds ``features`` once and gathers ``rows``)."""

    features: Tensor  # [U, Dc] float32
    rows: Tensor  # [B, G] long
    any_model: bool = False  # as CandidateTable.any_model

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the ``cand_x`` it stands for, ``[B, G, Dc]``."""
        return (*self.rows.shape, self.features.shape[-1])

    def dim(self) -> int:
        return self.rows.dim() + 1

    def __getitem__(self, index: Any) -> SharedCandidates:
        return SharedCandidates(self.features, self.rows[index], self.any_model)

    def to(self, device: torch.device | str) -> SharedCandidates:
        return SharedCandidates(self.features.to(device), self.rows.to(device), self.any_model)

    def dense(self) -> Tensor:
        """The ``cand_x`` it stands for."""
        return gather_rows(self.features, self.rows)


def check_mode(mode: str | bool) -> None:
    if not any(mode is m or (isinstance(mode, str) and mode == m) for m in MODES):
        raise ValueError(f"candidate_table must be auto, true or false, got {mode!r}; e.g. candidate_table=false")


def find_table(cand_x: Tensor, cand_ids: Tensor | None, mask: Tensor, mode: str | bool) -> CandidateTable | None:
    """The table of ``cand_x``'s distinct candidates by ``cand_ids`` (-1 at padding), or None: ``mode`` is
    false, there are no ids, the candidates recur fewer than :data:`MIN_REPEATS` times on average, there are too
    many for a batch of :data:`LARGEST_BATCH` groups to pay, or two slots with one id have other features (the ids
    then do not name the features)."""
    check_mode(mode)
    if mode is False or cand_ids is None or cand_x.shape[0] == 0:
        return None
    ids = torch.where(mask, cand_ids, torch.full_like(cand_ids, -1))
    codes, rows = torch.unique(ids, return_inverse=True)  # sorted: -1 (padding) first when there is any
    if MIN_REPEATS * len(codes) > ids.numel() or not pays(len(codes), LARGEST_BATCH * ids.shape[1]):
        return None
    # each code's first slot gives its row of features
    flat = rows.reshape(-1)
    first = torch.full((len(codes),), flat.numel(), dtype=torch.long)
    first.scatter_reduce_(0, flat, torch.arange(flat.numel()), reduce="amin")
    features = cand_x.reshape(-1, cand_x.shape[-1]).index_select(0, first).clone()
    for start in range(0, cand_x.shape[0], _CHUNK):
        part = slice(start, start + _CHUNK)
        if not torch.equal(gather_rows(features, rows[part]), cand_x[part]):
            return None
    return CandidateTable(features, rows, any_model=mode is True)


def with_candidate_table(data: GroupData, mode: str | bool) -> GroupData:
    """``data`` with the table of its distinct candidates (:func:`find_table`; none for ``false``, or when they do not
    recur), which its batches then carry for a towers model; nothing else is copied."""
    out = {f.name: getattr(data, f.name) for f in fields(data)}
    out["cand_table"] = find_table(data.cand_x, data.cand_ids, data.mask, mode)
    return GroupData(**out, checks="none")
