"""Three rankers written the way people write them, none with v3kit's method names; ``docs/your_model.md`` imports
each into v3kit without a subclass or an adapter.

* :class:`RenamedTowers`: two towers, but the methods are ``encode_q`` / ``encode_docs`` (``model.methods``).
* :class:`CfgRanker`: the constructor takes one config dict, the towers are attributes, and the only method is
  ``forward(query_feats, doc_feats) -> scores / temperature`` (a scorer; ``model.kwargs: {cfg: {...}}``).
* :class:`CrossEncoder`: scores each (query, candidate) pair jointly; no embeddings to dot (a scorer).
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class RenamedTowers(nn.Module):
    def __init__(self, query_dim: int, cand_dim: int, dim: int = 16) -> None:
        super().__init__()
        self.q_net = mlp(query_dim, 32, dim)
        self.d_net = mlp(cand_dim, 32, dim)

    def encode_q(self, q: torch.Tensor) -> torch.Tensor:  # [B, Dq] -> [B, dim]
        return self.q_net(q)

    def encode_docs(self, docs: torch.Tensor) -> torch.Tensor:  # [B, G, Dc] -> [B, G, dim]
        return self.d_net(docs)

    def score(self, q: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:  # what the user's own training calls
        return torch.einsum("bd,bgd->bg", self.encode_q(q), self.encode_docs(docs))


class CfgRanker(nn.Module):
    """``cfg``: ``query_dim``, ``doc_dim``, ``dim``, ``hidden``, ``dropout``, ``temperature`` (cosine / T)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.query_tower = mlp(cfg["query_dim"], cfg.get("hidden", 32), cfg.get("dim", 16), cfg.get("dropout", 0.1))
        self.doc_tower = mlp(cfg["doc_dim"], cfg.get("hidden", 32), cfg.get("dim", 16), cfg.get("dropout", 0.1))
        self.register_buffer("temperature", torch.tensor(float(cfg.get("temperature", 0.05))))

    def forward(self, query_feats: torch.Tensor, doc_feats: torch.Tensor) -> torch.Tensor:  # -> [B, G]
        q = nn.functional.normalize(self.query_tower(query_feats), dim=-1)
        d = nn.functional.normalize(self.doc_tower(doc_feats), dim=-1)
        return torch.einsum("bd,bgd->bg", q, d) / self.temperature


class CrossEncoder(nn.Module):
    """An MLP over the concatenated (query, candidate) features and their product: one score per pair."""

    def __init__(self, query_dim: int, cand_dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(query_dim, cand_dim)
        self.net = nn.Sequential(nn.Linear(3 * cand_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, query_x: torch.Tensor, cand_x: torch.Tensor) -> torch.Tensor:  # [B, Dq], [B, G, Dc] -> [B, G]
        q = self.proj(query_x).unsqueeze(1).expand_as(cand_x)
        return self.net(torch.cat([q, cand_x, q * cand_x], dim=-1)).squeeze(-1)
