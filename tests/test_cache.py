"""The packed, memory-mapped data cache: same tensors, fast path without parsing, invalidation, float16."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from v3kit.data import DataValidationError, Splits, ingest, iterate_batches, split_by_query, to_long_frame
from v3kit.data.cache import load_cached
from v3kit.data.synthetic import SyntheticConfig, make_world
from v3kit.data.tables import load_groups
from v3kit.train.model import ModelConfig
from v3kit.train.sft import SFTConfig, train_sft


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.parquet"
    to_long_frame(make_world(SyntheticConfig(n_queries=60, seed=4))).to_parquet(path)
    return path


def same(a, b) -> None:
    assert a.query_ids == b.query_ids
    for name in ("query_x", "cand_x", "mask", "labels", "rewards", "utility"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_cache_gives_the_same_data_and_skips_parsing_the_second_time(data_file, monkeypatch):
    plain = load_groups(data_file)
    first = load_cached(data_file)
    same(first, plain)
    assert (data_file.parent / "data.parquet.v3kit-cache" / "float32" / "cand_x.npy").exists()

    def no_parse(path):
        raise AssertionError("the data file was parsed although the cache is valid")

    monkeypatch.setattr(ingest, "load_parquet", no_parse)
    second = load_cached(data_file)
    same(second, plain)
    assert isinstance(second.cand_x, torch.Tensor) and second.cand_x.is_contiguous()
    batch = next(iterate_batches(second, 7))
    assert torch.equal(batch.cand_x, plain.cand_x[:7])
    # A touched file with the same content is recognised by its hash, without a rebuild.
    st = data_file.stat()
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    same(load_cached(data_file), plain)


def test_changed_file_rebuilds_the_cache(data_file):
    load_cached(data_file)
    other = make_world(SyntheticConfig(n_queries=40, seed=9))
    to_long_frame(other).to_parquet(data_file)
    same(load_cached(data_file), load_groups(data_file))


def test_float16_features_and_float32_batches(data_file):
    plain = load_groups(data_file)
    for d in (
        load_cached(data_file, feature_dtype="float16"),
        load_groups(data_file, feature_dtype="float16"),
    ):
        assert d.cand_x.dtype == torch.float16
        torch.testing.assert_close(d.cand_x.float(), plain.cand_x, atol=2e-3, rtol=1e-3)
        assert next(iterate_batches(d, 5)).cand_x.dtype == torch.float32
    with pytest.raises(ValueError, match="feature_dtype"):
        load_cached(data_file, feature_dtype="bfloat8")


def test_float16_overflow_is_refused(tmp_path):
    world = make_world(SyntheticConfig(n_queries=10, seed=1))
    world.cand_x[0, 0, 0] = 1e6
    path = tmp_path / "big.parquet"
    to_long_frame(world).to_parquet(path)
    with pytest.raises(DataValidationError, match=r"cand_x has values beyond float16's range"):
        load_cached(path, feature_dtype="float16")
    assert not any(p.name.startswith(".building") for p in (tmp_path / "big.parquet.v3kit-cache").iterdir())


def test_training_on_cached_data_matches_in_memory(data_file):
    def run(data):
        s = split_by_query(data, seed=0)
        r = train_sft(Splits(s.train, s.val, s.test), ModelConfig(), SFTConfig(epochs=1, batch_size=16), progress=False)
        return r.train_history["loss"].to_numpy()

    np.testing.assert_array_equal(run(load_cached(data_file)), run(load_groups(data_file)))


def test_cached_splits_equal_split_by_query(data_file):
    from v3kit.data.cache import cached_splits

    ref = split_by_query(load_groups(data_file), val_frac=0.2, test_frac=0.1, seed=3)
    for _ in range(2):  # built, then reopened
        got = cached_splits(data_file, val_frac=0.2, test_frac=0.1, seed=3)
        for part in ("train", "val", "test"):
            same(getattr(got, part), getattr(ref, part))
    assert cached_splits(data_file, seed=4).val.query_ids != got.val.query_ids


def test_pipeline_data_through_the_cache(data_file):
    from v3kit.config import load_config
    from v3kit.pipeline import prepare_data

    plain = prepare_data(load_config(None, [f"data.path={data_file}"]))
    cached = prepare_data(load_config(None, [f"data.path={data_file}", "data.cache=true"]))
    for part in ("train", "val", "test"):
        same(getattr(cached, part), getattr(plain, part))
