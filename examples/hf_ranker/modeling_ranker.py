"""Stands in for *your* Hugging Face model: a ranker written as a ``PreTrainedModel`` with its ``PretrainedConfig``,
saved with ``save_pretrained``. Nothing here knows about v3kit.

``forward(query_x [B, Dq], cand_x [B, G, Dc]) -> scores [B, G]``: the cosine of two MLP towers divided by the
config's ``score_temperature``, as its training scored it (transformers reserves ``temperature`` for generation).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class RankerConfig(PretrainedConfig):
    model_type = "tiny_feature_ranker"

    def __init__(
        self,
        query_dim: int = 16,
        doc_dim: int = 16,
        hidden: int = 32,
        dim: int = 16,
        score_temperature: float = 0.05,
        dropout: float = 0.1,
        **kwargs,
    ) -> None:
        self.query_dim, self.doc_dim, self.hidden, self.dim = query_dim, doc_dim, hidden, dim
        self.score_temperature, self.dropout = score_temperature, dropout
        super().__init__(**kwargs)


def _tower(in_dim: int, hidden: int, dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class FeatureRanker(PreTrainedModel):
    config_class = RankerConfig

    def __init__(self, config: RankerConfig) -> None:
        super().__init__(config)
        self.query_tower = _tower(config.query_dim, config.hidden, config.dim, config.dropout)
        self.doc_tower = _tower(config.doc_dim, config.hidden, config.dim, config.dropout)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, query_x: torch.Tensor, cand_x: torch.Tensor) -> torch.Tensor:
        q = nn.functional.normalize(self.query_tower(query_x), dim=-1)
        d = nn.functional.normalize(self.doc_tower(cand_x), dim=-1)
        return torch.einsum("bd,bgd->bg", q, d) / self.config.score_temperature
