"""Stands in for *your* sentence-transformers fine-tuning: a small bi-encoder trained on the config's text table with
in-batch ranking loss (scale 20 on cosines, as sentence-transformers' MultipleNegativesRankingLoss), saved with
``SentenceTransformer.save``. v3kit never wrote this file.

    python examples/hf_ranker/train_st.py --config examples/hf_ranker/text.yaml --out runs/hf_ranker/st_v2

``--base all-MiniLM-L6-v2`` (or any sentence-transformers directory) fine-tunes that model; the default builds a
tiny 2-layer BERT with all-MiniLM-L6-v2's tokenizer, so the example runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from sentence_transformers import SentenceTransformer
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from v3kit.config import load_config
from v3kit.data.text import encoder_path
from v3kit.pipeline import prepare_data


def tiny_model(seed: int, max_tokens: int = 64) -> SentenceTransformer:
    """A 2-layer, 32-wide BERT with mean pooling and L2 normalisation (all-MiniLM-L6-v2's layout, much smaller)."""
    try:  # sentence-transformers >= 6 / earlier
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(encoder_path("all-MiniLM-L6-v2"))
    bert = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=max_tokens,
        )
    )
    with tempfile.TemporaryDirectory() as d:
        bert.save_pretrained(d)
        tok.save_pretrained(d)
        word = models.Transformer(d, max_seq_length=max_tokens)
    return SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()], device="cpu")


def embed(model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    prep = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers >= 6 / earlier
    return model(prep(texts))["sentence_embedding"]


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="v3kit config whose text table (and seed) to train on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--base", help="a sentence-transformers model to fine-tune (default: a tiny BERT from scratch)")
    p.add_argument("--out", required=True, help="the directory SentenceTransformer.save writes")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.set)
    train = prepare_data(cfg).train  # the split v3kit will use, so the test split stays unseen
    model = SentenceTransformer(encoder_path(args.base), device="cpu") if args.base else tiny_model(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 if not args.base else 2e-5)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(train)).split(32):
            b, g = len(idx), train.cand_x.shape[1]
            q = embed(model, [train.query_text[i] for i in idx])
            c = embed(model, [t for i in idx for t in train.cand_text[i]]).view(b, g, -1)
            logits = (20.0 * torch.einsum("bd,bgd->bg", q, c)).masked_fill(~train.mask[idx], float("-inf"))
            loss = nn.functional.cross_entropy(logits, train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save(args.out)
    print(f"saved {args.out} (sentence-transformers model, last batch loss {loss.item():.4f})")
    return Path(args.out)


if __name__ == "__main__":
    main()
