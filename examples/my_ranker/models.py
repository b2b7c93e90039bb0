"""A user's own two-tower ranker, written without v3kit (its layer names are not v3kit's ``query_tower`` /
``cand_tower``). It uses v3kit's default tower method names ``encode_query`` / ``encode_candidates``; other names,
other constructors and scorers (cross-encoders) are in ``examples/any_ranker`` and ``docs/your_model.md``."""

import torch
from torch import nn


class Encoder(nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear, with a learnt output scale."""

    def __init__(self, in_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.out(torch.relu(self.norm(self.proj(x))))


class MyTwoTower(nn.Module):
    def __init__(self, query_dim: int, cand_dim: int, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.user_encoder = Encoder(query_dim, hidden, dim)
        self.item_encoder = Encoder(cand_dim, hidden, dim)

    def encode_query(self, query_x: torch.Tensor) -> torch.Tensor:  # [B, Dq] -> [B, dim]
        return self.user_encoder(query_x)

    def encode_candidates(self, cand_x: torch.Tensor) -> torch.Tensor:  # [B, G, Dc] -> [B, G, dim]
        return self.item_encoder(cand_x)
