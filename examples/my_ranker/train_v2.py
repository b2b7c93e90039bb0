"""Stands in for *your* v2 training code: trains ``MyTwoTower`` (models.py beside this file) with a plain PyTorch
loop and saves a plain ``state_dict``, as most training scripts do, here wrapped as ``{"model": ..., "epoch": ...}``
with the ``module.`` prefix that DataParallel / DistributedDataParallel add. v3kit never wrote this file;
``v3kit import-sft`` turns it into a v3kit SFT checkpoint.

    python examples/my_ranker/train_v2.py --config examples/my_ranker/config.yaml --out runs/my_ranker/v2.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # models.py beside this script
from models import MyTwoTower  # noqa: E402

from v3kit.config import load_config  # noqa: E402
from v3kit.pipeline import prepare_data  # noqa: E402


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="v3kit config whose data (and seed) to train on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--dim", type=int, default=16)
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.set)
    train = prepare_data(cfg).train  # the same split v3kit will use, so the test split stays unseen
    torch.manual_seed(cfg.seed)
    model = MyTwoTower(train.query_dim, train.cand_dim, dim=args.dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(train)).split(64):
            q = model.encode_query(train.query_x[idx])  # [B, dim]
            c = model.encode_candidates(train.cand_x[idx])  # [B, G, dim]
            logits = torch.einsum("bd,bgd->bg", q, c).masked_fill(~train.mask[idx], float("-inf"))
            loss = nn.functional.cross_entropy(logits, train.labels[idx])  # the human label, as v2 SFT does
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # nn.DataParallel on CPU just wraps the module; its state_dict keys get "module." like DDP's.
    torch.save({"model": nn.DataParallel(model).state_dict(), "epoch": args.epochs}, out)
    print(
        f"saved {out} (plain state_dict of MyTwoTower, {sum(p.numel() for p in model.parameters())} parameters, "
        f"last batch loss {loss.item():.4f})"
    )
    return out


if __name__ == "__main__":
    main()
