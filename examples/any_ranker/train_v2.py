"""Stands in for *your* training code: trains one of the rankers in ``models.py`` with its own scoring method and
saves a plain ``state_dict``. v3kit never wrote this file.

    python examples/any_ranker/train_v2.py --model CfgRanker --config examples/any_ranker/config.yaml \
        --out runs/any_ranker/cfg_v2.pt
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

# models.py beside this script, loaded by path under its own name (examples/my_ranker has a models.py too)
_spec = importlib.util.spec_from_file_location("any_ranker_models", Path(__file__).resolve().parent / "models.py")
models = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = models
_spec.loader.exec_module(models)


def build(name: str, query_dim: int, cand_dim: int) -> tuple[nn.Module, object]:
    """The model and the method the user's own training scores with."""
    if name == "RenamedTowers":
        m = models.RenamedTowers(query_dim, cand_dim)
        return m, m.score
    if name == "CfgRanker":
        m = models.CfgRanker({"query_dim": query_dim, "doc_dim": cand_dim, "dim": 16, "hidden": 32})
        return m, m
    if name == "CrossEncoder":
        m = models.CrossEncoder(query_dim, cand_dim)
        return m, m
    raise SystemExit(f"--model must be RenamedTowers, CfgRanker or CrossEncoder, got {name!r}")


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--config", help="v3kit config whose data (and seed) to train on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.set)
    train = prepare_data(cfg).train  # the split v3kit will use, so the test split stays unseen
    torch.manual_seed(cfg.seed)
    model, score = build(args.model, train.query_dim, train.cand_dim)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(train)).split(64):
            logits = score(train.query_x[idx], train.cand_x[idx]).masked_fill(~train.mask[idx], float("-inf"))
            loss = nn.functional.cross_entropy(logits, train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    print(f"saved {out} (state_dict of {args.model}, last batch loss {loss.item():.4f})")
    return out


if __name__ == "__main__":
    main()
