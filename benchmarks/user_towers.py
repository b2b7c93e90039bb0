"""A user's two-tower module for ``benchmarks/stacked.py --user-model``: the built-in towers' architecture (an MLP
per tower, GELU, ``model.hidden`` then ``model.emb_dim``) written as a user would write it, so the stacked trainer
cannot use its batched matmuls and takes the ``torch.func.vmap`` path (``v3kit/train/stacked_func.py``)."""

from __future__ import annotations

from torch import Tensor, nn


def _mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.GELU()]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class UserTowers(nn.Module):
    def __init__(self, query_dim: int, cand_dim: int, hidden: list[int] = (64,), emb_dim: int = 32) -> None:
        super().__init__()
        self.query = _mlp(query_dim, list(hidden), emb_dim)
        self.cand = _mlp(cand_dim, list(hidden), emb_dim)

    def encode_query(self, query_x: Tensor) -> Tensor:
        return self.query(query_x)

    def encode_candidates(self, cand_x: Tensor) -> Tensor:
        return self.cand(cand_x)
