"""``v3kit.text_model``: the stable public path of the text ranker (the code lives in :mod:`v3kit.train.text_model`).

``model.target: v3kit.text_model:TextTwoTower`` is documented and recorded in checkpoints, so it must keep loading.
"""

from .train.text_model import SentenceTransformerRanker, TextTwoTower

__all__ = ["SentenceTransformerRanker", "TextTwoTower"]
