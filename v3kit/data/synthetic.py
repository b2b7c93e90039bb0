"""A seeded synthetic ranking world whose ground truth is known.

Hidden latent vectors give every (query, candidate) pair a true utility. The towers only see noisy linear
transforms of the latents, so they must learn. Groups look like beams: most candidates are plausible variations
around the query's intent, a few are random. Rewards are the true utility plus noise plus an optional exploitable
*bias*: a candidate "style" latent that the reward likes but the utility ignores (think length or a templated
phrase the reward model over-scores). The human label is the best candidate by true utility seen through noise.

``reward_bias`` therefore controls how much reward and label disagree, the knob that decides whether maximising
reward (GRPO) can make label metrics worse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bounds import check_max, require_memory
from .contract import GroupData


@dataclass
class SyntheticConfig:
    n_queries: int = 3000
    """Queries (groups) in the world; at most 100,000,000."""
    group_size: int = 8
    """G, the largest group; at most 100,000."""
    min_group_size: int = 4
    """Groups are ragged: sizes uniform in [min_group_size, group_size]."""
    feature_dim: int = 16
    """Observed feature dim of queries and candidates; at most 1,000,000."""
    latent_dim: int = 8
    """Hidden intent dim; at most 1,000,000."""
    random_frac: float = 0.25
    """Share of each beam that is random rather than a variation of the query intent."""
    obs_noise: float = 0.3
    """Noise on the observed features."""
    label_noise: float = 1.0
    """Std of Gaussian noise on utility before the human picks the argmax."""
    reward_noise: float = 0.3
    """Std of Gaussian noise on the reward."""
    reward_bias: float = 0.5
    """Weight of the style latent in the reward (0 = reward agrees with utility)."""
    seed: int = 0
    """World seed, independent of the run's ``seed``: the same world under every run seed."""

    def __post_init__(self) -> None:
        if self.n_queries < 10:
            raise ValueError(f"data.synthetic.n_queries must be >= 10, got {self.n_queries}")
        if not 2 <= self.min_group_size <= self.group_size:
            raise ValueError(
                f"data.synthetic.min_group_size ({self.min_group_size}) must be in [2, group_size={self.group_size}]"
            )
        for name in ("obs_noise", "label_noise", "reward_noise", "reward_bias"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.synthetic.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.random_frac <= 1:
            raise ValueError(f"data.synthetic.random_frac must be in [0, 1], got {self.random_frac}")
        if self.feature_dim < 1 or self.latent_dim < 1:
            raise ValueError(
                f"data.synthetic.feature_dim and data.synthetic.latent_dim must be >= 1, got "
                f"{self.feature_dim} and {self.latent_dim}"
            )
        # Generous per-field bounds that catch typos; a world that is in bounds but too big for this machine is
        # refused by make_world's memory check before anything is allocated.
        for name, bound in (
            ("n_queries", 100_000_000),
            ("group_size", 100_000),
            ("feature_dim", 1_000_000),
            ("latent_dim", 1_000_000),
        ):
            check_max(f"data.synthetic.{name}", getattr(self, name), bound, "is the value a typo?")


def world_bytes(cfg: SyntheticConfig) -> int:
    """Peak bytes :func:`make_world` allocates, an upper estimate counted from its float32 temporaries: per
    (query, candidate) pair about four latent-sized and three feature-sized arrays plus a dozen scalars."""
    n, G, k, d = cfg.n_queries, cfg.group_size, cfg.latent_dim, cfg.feature_dim
    return 4 * (n * G * (4 * (k + 1) + 3 * d + 12) + n * (2 * k + 2 * d))


def make_world(cfg: SyntheticConfig | None = None) -> GroupData:
    """Generate the synthetic dataset (with ``utility``) deterministically from ``cfg.seed``."""
    cfg = cfg or SyntheticConfig()
    require_memory(
        world_bytes(cfg),
        f"data.synthetic (n_queries {cfg.n_queries:_} x group_size {cfg.group_size:_} "
        f"x feature_dim {cfg.feature_dim:_}, latent_dim {cfg.latent_dim:_})",
        "lower data.synthetic.n_queries, group_size or feature_dim",
    )
    g = torch.Generator().manual_seed(cfg.seed)
    n, G, k, d = cfg.n_queries, cfg.group_size, cfg.latent_dim, cfg.feature_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    # Fixed random projections: the "feature extractors" the towers have to invert.
    proj_q = randn(k, d) / k**0.5
    proj_c = randn(k + 1, d) / (k + 1) ** 0.5  # +1: the style latent is visible in candidate features

    z_q = randn(n, k)
    is_random = torch.rand(n, G, generator=g) < cfg.random_frac
    variation = 0.7 * z_q.unsqueeze(1) + 0.7 * randn(n, G, k)
    z_c = torch.where(is_random.unsqueeze(-1), randn(n, G, k), variation)
    style = randn(n, G)

    utility = torch.einsum("nk,ngk->ng", z_q, z_c) / k**0.5
    rewards = utility + cfg.reward_bias * style + cfg.reward_noise * randn(n, G)

    sizes = torch.randint(cfg.min_group_size, G + 1, (n,), generator=g)
    mask = torch.arange(G).unsqueeze(0) < sizes.unsqueeze(1)
    noisy_u = (utility + cfg.label_noise * randn(n, G)).masked_fill(~mask, float("-inf"))
    labels = noisy_u.argmax(dim=1)

    query_x = z_q @ proj_q + cfg.obs_noise * randn(n, d)
    cand_x = torch.cat([z_c, style.unsqueeze(-1)], dim=-1) @ proj_c + cfg.obs_noise * randn(n, G, d)
    zero = torch.zeros(())
    return GroupData(
        query_x=query_x,
        cand_x=torch.where(mask.unsqueeze(-1), cand_x, zero),
        mask=mask,
        labels=labels,
        rewards=torch.where(mask, rewards, zero),
        query_ids=[f"q{i:06d}" for i in range(n)],
        utility=torch.where(mask, utility, zero),
    )
