"""Candidates shared across groups (``candidate_table``): the table rebuilds every slot bit for bit, scores and
gradients through it equal the dense ones, and whole runs, alone and stacked, match the runs without it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_config
from custom_models import BilinearRanker
from test_stacked import _assert_same_run, assert_resume_is_bit_identical

from v3kit.config import ConfigError, load_config
from v3kit.data.contract import GroupData
from v3kit.data.long_frame import to_long_frame
from v3kit.data.shared_candidates import SharedCandidates, find_table, with_candidate_table
from v3kit.pipeline import prepare_data, run_pipeline
from v3kit.pipeline_stacked import run_stacked
from v3kit.train.model import ModelConfig, TwoTower, build_model, reads_shared, scores
from v3kit.train.stacked_plan import step_rows
from v3kit.train.stacked_towers import StackedTowers

SMALL = ["sft.epochs=2", "rce.epochs=2", "grpo.epochs=2", "data.split_seed=0"]


def _routing(n: int = 240, g: int = 8, pool: int = 20, d: int = 12, seed: int = 0) -> GroupData:
    """A routing-style task: every group draws its candidates from one pool of ``pool``; groups of 5-``g``
    (padding: id -1, zero features); the reward and the label follow a hidden query-candidate affinity."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen)
    feats = torch.randn(pool, d, generator=gen)
    which = torch.stack([torch.randperm(pool, generator=gen)[:g] for _ in range(n)])
    sizes = torch.randint(5, g + 1, (n,), generator=gen)
    mask = torch.arange(g).unsqueeze(0) < sizes.unsqueeze(1)
    affinity = torch.einsum("nd,ngd->ng", q @ torch.randn(d, d, generator=gen), feats[which])
    rewards = torch.where(mask, affinity + 0.5 * torch.randn(n, g, generator=gen), torch.zeros(()))
    labels = torch.where(mask, affinity + torch.randn(n, g, generator=gen), torch.tensor(-1e9)).argmax(dim=1)
    cand_x = torch.where(mask.unsqueeze(-1), feats[which], torch.zeros(()))
    ids = torch.where(mask, which, torch.full_like(which, -1))
    return GroupData(q, cand_x, mask, labels, rewards, [f"q{i}" for i in range(n)], cand_ids=ids)


@pytest.fixture(scope="module")
def routing_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("routing") / "routing.parquet"
    to_long_frame(_routing()).to_parquet(path)
    return path


def test_the_table_rebuilds_every_slot_bit_for_bit():
    data = _routing()
    table = find_table(data.cand_x, data.cand_ids, data.mask, "auto")
    assert table is not None and not table.any_model
    assert len(table.features) == 20 + 1  # the pool and one row for every padding slot
    assert torch.equal(table.features[table.rows], data.cand_x)
    # each distinct id has its own row, and padding slots share one
    ids = torch.where(data.mask, data.cand_ids, -1)
    for code in ids.unique().tolist():
        assert table.rows[ids == code].unique().numel() == 1
    part = data.subset([3, 1, 4])
    assert torch.equal(part.cand_table.features[part.cand_table.rows], part.cand_x) if part.cand_table else True
    shared = table.batch(torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]))  # any index shape: 64 slots, 21 rows
    assert shared is not None and shared.shape == (4, 2, 8, 12)
    assert torch.equal(shared.dense(), data.cand_x[torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])])
    assert table.batch(torch.arange(2)) is None  # 16 slots for 21 rows: embedding the table would cost more


def test_no_table_without_ids_without_repeats_when_ids_disagree_or_switched_off():
    data = _routing()
    assert find_table(data.cand_x, data.cand_ids, data.mask, True).any_model
    assert find_table(data.cand_x, None, data.mask, "auto") is None
    assert find_table(data.cand_x, data.cand_ids, data.mask, False) is None
    unique = torch.arange(data.mask.numel()).view_as(data.cand_ids)  # every slot its own candidate
    assert find_table(data.cand_x, unique, data.mask, "auto") is None
    many = _routing(n=3000, pool=5000, d=2)  # ~4,900 candidates in 24,000 slots, yet not even 1,024 groups of 8 pay
    codes = many.cand_ids.unique().numel()
    assert 4 * codes <= many.cand_ids.numel() and 2 * codes > 1024 * 8
    assert find_table(many.cand_x, many.cand_ids, many.mask, "auto") is None
    other = data.cand_x.clone()
    other[7, 0, 3] += 1e-6  # one slot's features differ from its id's other slots
    assert find_table(other, data.cand_ids, data.mask, "auto") is None
    with pytest.raises(ValueError, match="candidate_table must be auto, true or false"):
        find_table(data.cand_x, data.cand_ids, data.mask, "yes")
    with pytest.raises(ConfigError, match="candidate_table"):
        load_config(None, ["candidate_table=sometimes"])
    assert load_config(None, ["candidate_table=off"]).candidate_table is False  # YAML's off


@pytest.mark.parametrize(
    "kw", [{}, {"normalize": True}, {"residual": True, "residual_kind": "linear"}, {"hidden": [16, 8]}]
)
def test_scores_and_gradients_through_the_table_equal_the_dense_ones(kw):
    """The dense path (the tower over every slot) is the independent reference: the table path must give its scores
    and every parameter's gradient, a repeated candidate's gradient summed over its slots."""
    data = _routing(n=16)
    table = find_table(data.cand_x, data.cand_ids, data.mask, "auto")
    torch.manual_seed(0)
    model = build_model(ModelConfig(emb_dim=8, **kw), 12, 12)
    for p in model.parameters():  # off the zero init of a residual tower's last layer, so every weight matters
        p.data.add_(0.1 * torch.randn_like(p))
    weights = torch.randn(16, 8)

    def run(cand: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        s = scores(model, data.query_x, cand)
        (s * weights).sum().backward()
        return s.detach(), [p.grad.clone() for p in model.parameters()]

    s_dense, g_dense = run(data.cand_x)
    s_table, g_table = run(SharedCandidates(table.features.float(), table.rows))
    torch.testing.assert_close(s_table, s_dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_table, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # the stacked towers: three copies, each with its own batch of rows
    members = [model, *(build_model(ModelConfig(emb_dim=8, **kw), 12, 12) for _ in range(2))]
    stack = StackedTowers(members)
    rows = torch.stack([table.rows[torch.randperm(16)[:6]] for _ in range(3)])
    q = torch.randn(3, 6, 12)
    w = torch.randn(3, 6, 8)

    def stacked(cand: torch.Tensor, *table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stack.zero_grad()
        s = stack.scores(q, cand, *table)
        (s * w).sum().backward()  # autograd accumulates into the stack's flat gradient buffer
        return s.detach(), stack.grad.clone()

    s_dense, g_dense = stacked(table.features[rows])
    s_table, g_table = stacked(rows, table.features)
    torch.testing.assert_close(s_table, s_dense, rtol=1e-5, atol=1e-6)
    assert g_dense.abs().sum() > 0
    torch.testing.assert_close(g_table, g_dense, rtol=1e-4, atol=1e-6)


class _Scorer(torch.nn.Module):
    def forward(self, query_x, cand_x):  # a cross-scorer: it needs every slot's features
        return (cand_x * query_x.unsqueeze(1)).sum(-1)


class _Featurized(BilinearRanker):
    def featurize(self, batch):  # its own inputs: the table would bypass them
        return batch.query_x, batch.cand_x


def test_only_models_that_embed_each_candidate_alone_read_the_table():
    builtin = TwoTower(4, 4)
    assert reads_shared(builtin, False) and reads_shared(builtin, True)
    user = BilinearRanker(4, 4)
    assert not reads_shared(user, False) and reads_shared(user, True)  # candidate_table: true vouches for it
    assert not reads_shared(_Scorer(), True)
    assert not reads_shared(_Featurized(4, 4), True)
    # a user model under candidate_table: true scores through the table as it scores the dense features
    data = _routing(n=16)
    table = find_table(data.cand_x, data.cand_ids, data.mask, True)
    shared = SharedCandidates(table.features, table.rows, True)
    user = BilinearRanker(12, 12)
    torch.testing.assert_close(scores(user, data.query_x, shared), scores(user, data.query_x, data.cand_x))
    torch.testing.assert_close(scores(_Scorer(), data.query_x, shared), scores(_Scorer(), data.query_x, data.cand_x))


def test_step_rows_charges_the_towers_rows_the_table_leaves():
    data = _routing()
    model = TwoTower(12, 12)
    assert step_rows(model, data, 32) == 256  # no table: the batch's slots
    shared = with_candidate_table(data, "auto")
    # a query tower of 32 rows and a candidate tower of 21 instead of 32 and 256
    assert step_rows(model, shared, 32) == round(256 * (32 + 21) / (32 + 256))
    assert step_rows(model, shared, 2) == 16  # a table that does not pay at that batch size is not used


def _encoded_rows(monkeypatch) -> list[int]:
    rows: list[int] = []
    encode = TwoTower.encode_candidates
    monkeypatch.setattr(TwoTower, "encode_candidates", lambda self, x: rows.append(x.shape[-2]) or encode(self, x))
    return rows


def test_a_run_through_the_table_matches_the_run_without_it(tmp_path, routing_file, monkeypatch):
    common = [f"data.path={routing_file}", *SMALL, "sft.batch_size=16"]
    rows = _encoded_rows(monkeypatch)
    run_pipeline(tiny_config(tmp_path / "table", *common))
    assert rows and all(r == 21 for r in rows)  # every batch, training and evaluation, embedded the table
    rows.clear()
    run_pipeline(tiny_config(tmp_path / "dense", *common, "candidate_table=false"))
    assert rows and all(r == 8 for r in rows)  # [B, G, Dc]: the groups' own slots
    _assert_same_run(tmp_path / "dense", tmp_path / "table")
    assert prepare_data(tiny_config(tmp_path / "x", *common)).train.cand_table is not None


def test_the_memory_mapped_splits_get_the_table_too(tmp_path, routing_file):
    cfg = tiny_config(tmp_path / "run", f"data.path={routing_file}", "data.cache=true", f"data.cache_dir={tmp_path}")
    splits = prepare_data(cfg)
    for part in (splits.train, splits.val, splits.test):
        assert part.cand_table is not None
        assert torch.equal(part.cand_table.features[part.cand_table.rows].float(), part.cand_x.float())


@pytest.mark.parametrize("table", ["auto", "false"])
def test_stacked_members_through_the_table_match_their_sequential_runs(tmp_path, routing_file, monkeypatch, table):
    from v3kit.train import stacked_towers

    common = [f"data.path={routing_file}", *SMALL, f"candidate_table={table}"]
    variants = [["seed=0"], ["seed=1", "grpo.kl_beta=0.5", "rce.label_weight=0.2"], ["seed=2", "grpo.samples=sampled"]]
    for i, v in enumerate(variants):
        run_pipeline(tiny_config(tmp_path / f"seq{i}", *common, *v))
    seen: list[bool] = []
    stacked_scores = stacked_towers.StackedTowers.scores

    def spy(self, q, c, shared=None):
        seen.append(shared is not None)
        return stacked_scores(self, q, c, shared)

    monkeypatch.setattr(stacked_towers.StackedTowers, "scores", spy)
    out = run_stacked([tiny_config(tmp_path / f"stk{i}", *common, *v) for i, v in enumerate(variants)])
    assert out.stacked, out.notes
    assert seen and all(seen) is (table == "auto")  # training steps and evaluations alike
    for i, r in enumerate(out.results):
        assert not isinstance(r, BaseException), r
        _assert_same_run(tmp_path / f"seq{i}", tmp_path / f"stk{i}")


def test_the_switch_is_how_fast_not_what_is_trained(tmp_path, routing_file):
    """candidate_table leaves the experiment's hash alone (as threads does), so a grid's earlier results stay
    valid; the splits' cache of a grid worker still tells the two apart."""
    from v3kit.ablate.runner import _config_hash
    from v3kit.ablate.worker import splits_for

    a = tiny_config(tmp_path, f"data.path={routing_file}")
    b = dataclasses.replace(a, candidate_table=False)
    assert _config_hash(a) == _config_hash(b)
    assert splits_for(a).train.cand_table is not None and splits_for(b).train.cand_table is None
    frame = pd.read_parquet(routing_file)
    assert frame["candidate_id"].nunique() == 20


def test_a_stack_through_the_table_resumes_bit_identically_after_a_kill(tmp_path, routing_file, monkeypatch):
    assert_resume_is_bit_identical(
        tmp_path, ("rce:epoch1:step2", "grpo:epoch1:before_checkpoint"), (f"data.path={routing_file}",)
    )


def test_a_user_model_stacked_through_vmap_matches_its_runs_through_the_table(tmp_path, routing_file):
    """``candidate_table: true`` lets a user's towers model read the table in a run alone; its vmap stack embeds
    the slots as they are (dense), and the members still match their runs."""
    common = [f"data.path={routing_file}", *SMALL, "candidate_table=true", "model.target=custom_models:BilinearRanker"]
    variants = [["seed=0"], ["seed=1", "grpo.kl_beta=0.5"]]
    for i, v in enumerate(variants):
        run_pipeline(tiny_config(tmp_path / f"seq{i}", *common, *v))
    out = run_stacked([tiny_config(tmp_path / f"stk{i}", *common, *v) for i, v in enumerate(variants)])
    assert out.stacked, out.notes
    for i, r in enumerate(out.results):
        assert not isinstance(r, BaseException), r
        _assert_same_run(tmp_path / f"seq{i}", tmp_path / f"stk{i}")
