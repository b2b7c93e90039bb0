"""The ranker each rank trains under ``torchrun``: it encodes only this rank's rows of a batch and all-gathers the
rest (:mod:`v3kit.train.distributed` explains why that is exact)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .distributed import Dist, gather_rows
from .model import INTERFACE_ATTR, Interface, interface_of, scores


class SlicedGrad(nn.Module):
    """A ranker that encodes only this rank's rows of a batch and all-gathers the rest (see the module docstring)."""

    def __init__(self, model: nn.Module, dist: Dist) -> None:
        super().__init__()
        self.model, self.dist = model, dist
        self.inner = interface_of(model)
        # Towers: each tower's rows are sliced (as before); a scorer: its scores of this rank's groups.
        object.__setattr__(self, INTERFACE_ATTR, Interface(self.inner.kind))

    def forward(self, query_x: Tensor, cand_x: Tensor) -> Tensor:
        if not isinstance(query_x, Tensor) or not isinstance(cand_x, Tensor):
            raise ValueError(
                "torchrun needs models whose inputs are tensors (a model with featurize() runs in one process)"
            )
        n = query_x.shape[0]
        rows = self.dist.rows(n)
        return gather_rows(scores(self.model, query_x[rows], cand_x[rows]), n, self.dist)

    def _sliced(self, encode: Any, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(
                "torchrun needs models whose inputs are tensors (a model with featurize() runs in one process)"
            )
        n = x.shape[0]
        own = encode(x[self.dist.rows(n)])
        return gather_rows(own, n, self.dist)

    def encode_query(self, query_x: Tensor) -> Tensor:
        return self._sliced(getattr(self.model, self.inner.query), query_x)

    def encode_candidates(self, cand_x: Tensor) -> Tensor:
        return self._sliced(getattr(self.model, self.inner.candidates), cand_x)
