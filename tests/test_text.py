"""Text data: the embedding cache, text validation, frozen and end-to-end text modes, the stdlib-search table."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from v3kit.config import load_config
from v3kit.data import DataValidationError, Splits, from_long_frame, iterate_batches
from v3kit.data.stdlib_search import StdlibSearchConfig, build_table, reward_label_agreement
from v3kit.data.text import embed_texts
from v3kit.train.model import ModelConfig, model_inputs


class SpyEncoder:
    """A fake encoder: a vector derived from the text's md5, and a record of every text it was asked to embed."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @staticmethod
    def vector(text: str) -> np.ndarray:
        digest = hashlib.md5(text.encode()).digest()
        return np.frombuffer(digest, dtype=np.uint8)[:4].astype(np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.seen += texts
        return np.stack([self.vector(t) for t in texts])


def text_frame() -> pd.DataFrame:
    rows = []
    for q, (query, cands) in enumerate(
        [
            ("sort a list", ["sorted(iterable)", "open a file", "join two paths"]),
            ("read a file", ["open(file)", "sum of numbers", "sort a list"]),
        ]
    ):
        for c, cand in enumerate(cands):
            rows.append(
                {
                    "query_id": f"q{q}",
                    "candidate_id": f"q{q}-c{c}",
                    "query_text": query,
                    "candidate_text": cand,
                    "reward": float(c == 0),
                    "is_label": c == 0,
                }
            )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ cache
def test_cache_embeds_each_text_once_across_calls(tmp_path):
    spy = SpyEncoder()
    out = embed_texts(["a", "b", "a"], encoder_name="spy", cache_dir=tmp_path, encode=spy, progress=False)
    assert sorted(spy.seen) == ["a", "b"]  # the duplicate is embedded once
    np.testing.assert_array_equal(out, np.stack([SpyEncoder.vector(t) for t in ["a", "b", "a"]]))
    spy2 = SpyEncoder()  # a fresh process: only the disk cache remembers
    out2 = embed_texts(["b", "c", "a"], encoder_name="spy", cache_dir=tmp_path, encode=spy2, progress=False)
    assert spy2.seen == ["c"]
    np.testing.assert_array_equal(out2, np.stack([SpyEncoder.vector(t) for t in ["b", "c", "a"]]))
    spy3 = SpyEncoder()
    embed_texts(["c", "a", "b"], encoder_name="spy", cache_dir=tmp_path, encode=spy3, progress=False)
    assert spy3.seen == []
    # Another encoder (or truncation) is another cache: nothing is shared by mistake.
    spy4 = SpyEncoder()
    embed_texts(["a"], encoder_name="spy", max_tokens=16, cache_dir=tmp_path, encode=spy4, progress=False)
    assert spy4.seen == ["a"]
    assert not list(tmp_path.rglob("*.tmp"))  # shards are renamed into place


def test_missing_text_extra_says_what_to_install(monkeypatch, tmp_path):
    import sys

    from v3kit.data.text import load_sentence_encoder

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[text\]'"):
        load_sentence_encoder()
    # ... and the error comes only when a text actually needs embedding: a cached text needs no encoder.
    embed_texts(["x"], encoder_name="all-MiniLM-L6-v2", cache_dir=tmp_path, encode=SpyEncoder(), progress=False)
    assert embed_texts(["x"], encoder_name="all-MiniLM-L6-v2", cache_dir=tmp_path, progress=False).shape == (1, 4)


def test_frozen_mode_embeds_distinct_texts_once(tmp_path):
    spy = SpyEncoder()
    d = from_long_frame(
        text_frame(), embed=lambda t: embed_texts(t, encoder_name="spy", cache_dir=tmp_path, encode=spy, progress=False)
    )
    assert sorted(spy.seen) == sorted(set(text_frame()["query_text"]) | set(text_frame()["candidate_text"]))
    assert d.query_x.shape == (2, 4) and d.cand_x.shape == (2, 3, 4)
    torch.testing.assert_close(d.cand_x[1, 2], torch.tensor(SpyEncoder.vector("sort a list")))
    torch.testing.assert_close(d.query_x[0], torch.tensor(SpyEncoder.vector("sort a list")))
    assert d.query_text == ["sort a list", "read a file"] and d.cand_text[1][0] == "open(file)"


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "corrupt, pattern",
    [
        (
            lambda df: df.assign(query_text=df["query_text"].where(df.index != 1, "sort a LIST")),
            r"row 1 \(query_id='q0'\): query_text differs from the query's first row",
        ),
        (
            lambda df: df.assign(candidate_text=df["candidate_text"].where(df.index != 4, "  ")),
            r"row 4 \(query_id='q1'\): candidate_text is '  '; every candidate_text must be a non-empty string",
        ),
        (
            lambda df: df.assign(query_text=df["query_text"].where(df.index != 2, None)),
            r"row 2 \(query_id='q0'\): query_text is null",
        ),
        (
            lambda df: df.drop(columns=["candidate_text"]),
            r"missing column\(s\) \['candidate_features or candidate_text'\]",
        ),
    ],
)
def test_text_validation_names_row_and_fix(corrupt, pattern):
    with pytest.raises(DataValidationError, match=pattern) as e:
        from_long_frame(corrupt(text_frame()), embed=SpyEncoder())
    assert "\n" not in str(e.value)


def test_text_without_encoder_or_text_model_fails_clearly():
    with pytest.raises(DataValidationError, match="need a text encoder"):
        from_long_frame(text_frame())
    from v3kit.train.model import build_model

    with pytest.raises(ValueError, match="v3kit.text_model:TextTwoTower"):
        build_model(ModelConfig(), 0, 0)


def test_feature_models_get_feature_tensors():
    d = from_long_frame(text_frame(), embed=SpyEncoder())
    b = next(iterate_batches(d, 2))
    q, c = model_inputs(torch.nn.Linear(1, 1), b)
    assert q is b.query_x and c is b.cand_x


# ------------------------------------------------------------------------------------------------ stdlib table
def test_stdlib_table_is_deterministic_with_the_promised_structure():
    cfg = StdlibSearchConfig(max_queries=300)
    df = build_table(cfg)
    pd.testing.assert_frame_equal(df, build_table(cfg))
    assert "utility" not in df.columns and df["query_id"].nunique() == 300
    for qid, g in df.groupby("query_id"):
        assert len(g) == cfg.group_size and g["candidate_id"].is_unique
        assert g["is_label"].sum() == 1 and g.loc[g["is_label"], "candidate_id"].item() == qid
        # the summary line is the query, not part of the candidate text (else the match would be trivial)
        assert g["query_text"].iloc[0] not in g.loc[g["is_label"], "candidate_text"].item()
    # an independent count of the reward/label agreement
    agree = [g.loc[g["reward"].idxmax(), "is_label"] for _, g in df.groupby("query_id")]
    assert reward_label_agreement(df) == pytest.approx(np.mean(agree))
    assert 0.5 <= np.mean(agree) <= 0.75


# ------------------------------------------------------------------------------------------------ pipelines
def test_stdlib_pipeline_frozen_minilm(tmp_path, capsys, monkeypatch):
    from v3kit.cli import main
    from v3kit.pipeline import load_data

    args = [
        "progress=false",
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.path=builtin:stdlib_search",
        "data.stdlib_search.max_queries=20",
        "data.text_max_tokens=32",
        "model.normalize=true",
        "model.sim_temperature=0.05",
        "sft.epochs=2",
        "rce.epochs=1",
        "grpo.epochs=1",
    ]
    assert main(["run", *sum((["--set", a] for a in args), [])]) == 0
    out = capsys.readouterr().out
    assert "acc@1" in out and "utility@1" not in out
    summary = pd.read_csv(tmp_path / "run" / "summary.csv", index_col=0)
    assert list(summary.index) == ["sft", "rce", "grpo", "selected"] and np.isfinite(summary.to_numpy()).all()

    # The second load embeds nothing: every vector comes from the cache (loading an encoder would fail here).
    def no_encoder(*a, **k):
        raise AssertionError("the second run tried to embed")

    monkeypatch.setattr("v3kit.data.text.sentence_encoder", no_encoder)
    data = load_data(load_config(None, args))
    assert data.query_x.shape[1] == 384
    norms = data.cand_x[data.mask].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # MiniLM's embeddings are unit vectors


def test_end_to_end_tower_trains_only_its_top_layers(tmp_path):
    from v3kit.train.checkpoint import load_checkpoint, model_from_checkpoint
    from v3kit.train.sft import SFTConfig, train_sft
    from v3kit.train.text_model import TextTwoTower

    d = from_long_frame(text_frame(), text_mode="end_to_end")
    assert d.query_x.shape == (2, 0)
    kwargs = {"train_layers": 1, "max_tokens": 16}
    cfg = ModelConfig(target="v3kit.text_model:TextTwoTower", sim_temperature=0.05, kwargs=kwargs)
    res = train_sft(
        Splits(train=d, val=d, test=d),
        cfg,
        SFTConfig(epochs=1, lr=1e-3, batch_size=2),
        run_dir=tmp_path,
        progress=False,
    )
    before = dict(TextTwoTower(**kwargs).named_parameters())
    changed = {n for n, p in res.model.named_parameters() if not torch.equal(p, before[n])}
    top = {n for n in before if ".encoder.layer.5." in n}
    assert changed and changed <= top  # nothing below the top layer moved
    assert {n.split(".")[0] for n in changed} == {"query_encoder", "cand_encoder"}
    # The checkpoint holds only the trainable tensors and restores the trained model exactly.
    ckpt = load_checkpoint(tmp_path / "sft.pt")
    assert set(ckpt["model"]) == top
    restored = dict(model_from_checkpoint(ckpt).named_parameters())
    assert all(torch.equal(p, restored[n]) for n, p in res.model.named_parameters())
