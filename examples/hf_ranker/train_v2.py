"""Stands in for *your* Hugging Face training code: trains ``FeatureRanker`` (``modeling_ranker.py``) with its own
loop and saves it with ``save_pretrained``. v3kit never wrote this file.

    python examples/hf_ranker/train_v2.py --config examples/any_ranker/config.yaml --out runs/hf_ranker/v2

The class is registered for ``AutoModel`` first, so ``save_pretrained`` copies ``modeling_ranker.py`` beside the
weights and names it in config.json's ``auto_map``: the directory alone rebuilds the model.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from v3kit.config import load_config
from v3kit.pipeline import prepare_data

# modeling_ranker.py beside this script, loaded by path (save_pretrained copies the file it finds the class in)
_spec = importlib.util.spec_from_file_location(
    "modeling_ranker", Path(__file__).resolve().parent / "modeling_ranker.py"
)
modeling = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = modeling
_spec.loader.exec_module(modeling)


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="v3kit config whose data (and seed) to train on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="the save_pretrained directory to write")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.set)
    train = prepare_data(cfg).train  # the split v3kit will use, so the test split stays unseen
    torch.manual_seed(cfg.seed)
    model = modeling.FeatureRanker(modeling.RankerConfig(query_dim=train.query_dim, doc_dim=train.cand_dim))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(train)).split(64):
            logits = model(train.query_x[idx], train.cand_x[idx]).masked_fill(~train.mask[idx], float("-inf"))
            loss = nn.functional.cross_entropy(logits, train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    modeling.RankerConfig.register_for_auto_class()
    modeling.FeatureRanker.register_for_auto_class("AutoModel")
    model.save_pretrained(args.out)
    print(f"saved {args.out} (save_pretrained of FeatureRanker, last batch loss {loss.item():.4f})")
    return Path(args.out)


if __name__ == "__main__":
    main()
