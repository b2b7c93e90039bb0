"""``v3kit.model``: the stable public path of the built-in ranker (the code lives in :mod:`v3kit.train.model`).

``model.target: v3kit.model:TwoTower`` is the default target: every config and checkpoint records it (and the
model section's hash, which names shared SFT checkpoints, includes it), so this path must keep loading.
"""

from .train.model import (
    DEFAULT_TARGET,
    INTERFACE_ATTR,
    Interface,
    ModelConfig,
    RankerModel,
    TwoTower,
    build_model,
    compute_log_probs,
    import_object,
    model_inputs,
    scores,
)

__all__ = [
    "DEFAULT_TARGET",
    "INTERFACE_ATTR",
    "Interface",
    "ModelConfig",
    "RankerModel",
    "TwoTower",
    "build_model",
    "compute_log_probs",
    "import_object",
    "model_inputs",
    "scores",
]
