"""A user-defined ranker named by import string in tests (``custom_models:BilinearRanker``)."""

import torch
from torch import nn


class BilinearRanker(nn.Module):
    """Linear query map, identity-ish candidate map: a different architecture that follows the protocol."""

    def __init__(self, query_dim: int, cand_dim: int, emb_dim: int = 8) -> None:
        super().__init__()
        self.q = nn.Linear(query_dim, emb_dim)
        self.c = nn.Linear(cand_dim, emb_dim, bias=False)

    def encode_query(self, query_x: torch.Tensor) -> torch.Tensor:
        return self.q(query_x)

    def encode_candidates(self, cand_x: torch.Tensor) -> torch.Tensor:
        return self.c(cand_x)


class NotARanker(nn.Module):
    def __init__(self, query_dim: int, cand_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(query_dim, cand_dim)
