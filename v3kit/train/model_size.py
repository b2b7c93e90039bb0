"""How big a configured model is, and whether its training state fits the device: sized on the meta device before
anything is built for real (the bounds of :mod:`v3kit.bounds` check each key; this checks their combination).
"""

from __future__ import annotations

import torch

from ..bounds import require_memory
from .model import build_model

# Training keeps, per parameter, fp32 weights, a gradient, Adam's two moments, the frozen SFT reference and the
# post-RCE copy of the stage table: 6 x 4 bytes.
TRAIN_BYTES_PER_PARAM = 24


def count_params(model_cfg: object, query_dim: int, cand_dim: int) -> int | None:
    """Parameters of ``model_cfg``'s model, built on the meta device (no memory, no draw from torch's RNG); None
    when the model cannot be built there (a custom class that allocates real tensors in its constructor)."""
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            model = build_model(model_cfg, query_dim, cand_dim)  # type: ignore[arg-type]
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None
    finally:
        torch.set_rng_state(rng)


def check_model_fits(model_cfg: object, query_dim: int, cand_dim: int, device: torch.device | str = "cpu") -> None:
    """Refuse, before anything is built for real, a model whose training state cannot be allocated on ``device``:
    one line with its parameter count and the keys that size it."""
    n = count_params(model_cfg, query_dim, cand_dim)
    if n is None:
        return
    keys = "model.hidden / model.emb_dim" if getattr(model_cfg, "target", "").endswith(":TwoTower") else "model.kwargs"
    require_memory(
        n * TRAIN_BYTES_PER_PARAM,
        f"the model ({keys}: {n:.3g} parameters on features of dim "
        f"{query_dim}/{cand_dim}, {TRAIN_BYTES_PER_PARAM} bytes each to train)",
        f"lower {keys}",
        device,
    )
