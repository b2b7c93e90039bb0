"""Any common shape of ranker gets in without a subclass: renamed towers, a constructor taking one config dict, a
scorer (cross-encoder); docs/your_model.md's own commands; temperatures; dropout; the printed next: command."""

from __future__ import annotations

import io
import os
import runpy
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, tiny_config, write_text_table
from torch import nn

from v3kit.cli import main
from v3kit.data import split_by_query, to_long_frame
from v3kit.data.synthetic import SyntheticConfig, make_world
from v3kit.train.checkpoint import load_checkpoint, model_from_checkpoint
from v3kit.train.grpo import GRPOConfig, run_grpo
from v3kit.train.model import (
    ModelConfig,
    build_model,
    constructor_dims,
    import_object,
    interface_of,
    model_inputs,
    policy_log_probs,
    scores,
)
from v3kit.train.sft import load_sft

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "your_model.md"
MODELS = REPO / "examples" / "any_ranker" / "models.py"
QD = CD = 16


def doc_commands(tmp: Path) -> list[list[str]]:
    """Every command of every ``bash`` block in docs/your_model.md, outputs moved from runs/any_ranker to ``tmp``."""
    out = []
    for block in DOC.read_text().split("```bash\n")[1:]:
        body = block.split("```", 1)[0].replace("\\\n", " ")
        out += [shlex.split(line.replace("runs/any_ranker", str(tmp))) for line in body.splitlines() if line.strip()]
    return out


def run_doc_command(cmd: list[str], sets: list[str]) -> str:
    """Run one command in-process (``python script`` through its main, ``v3kit`` through the CLI); its stdout."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        if cmd[0] == "python":
            runpy.run_path(str(REPO / cmd[1]))["main"]([*cmd[2:], *sets, "--epochs", "2"])
        else:
            assert cmd[0] == "v3kit", cmd
            if cmd[1] == "notebook":
                return "skipped"  # run by test_notebook_command_runs_a_py_source_with_parameters
            assert main([*cmd[1:], *(sets if cmd[1] != "doctor" else [])]) == 0, cmd  # doctor reads the run's config
    return buf.getvalue()


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("any_ranker")
    sets = [a for s in [*TINY, f"data.cache_dir={tmp / 'cache'}"] for a in ("--set", s)]
    outputs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the doc runs its commands from the repository root (module targets from the cwd)
        mp.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != REPO])  # no PYTHONPATH help
        for cmd in doc_commands(tmp):
            outputs[" ".join(cmd)] = run_doc_command(cmd, sets)
    return tmp, outputs


def test_every_recipe_of_the_doc_imports_and_trains_without_a_subclass(doc_runs):
    tmp, outputs = doc_runs
    imports = [k for k in outputs if k.startswith("v3kit import-sft")]
    assert {k.split("--target ")[1].split()[0].rsplit(":")[1] for k in imports if "--target " in k} == {
        "RenamedTowers",
        "CfgRanker",
        "CrossEncoder",
    }
    # the Hugging Face recipes: a save_pretrained directory and a sentence-transformers one, no class named
    assert (
        sum("--from-pretrained" in k for k in imports) == 1
        and sum("--sentence-transformers" in k for k in imports) == 1
    )
    for key, out in outputs.items():
        if key.startswith("v3kit import-sft"):
            assert "next: v3kit run --sft" in out and "mean entropy" in out, out
        if key.startswith("v3kit doctor"):
            assert "checks flagged" in out, out
    runs = (("towers", "towers"), ("cfg", "scorer"), ("cross", "scorer"), ("cross_import", "scorer"))
    for name, kind in (*runs, ("hf", "scorer"), ("st", "towers")):
        run_dir = tmp / name
        summary = pd.read_csv(run_dir / "summary.csv", index_col=0)
        assert list(summary.index) == ["sft", "rce", "grpo", "selected"], name
        assert summary.notna().all().all(), name
        ckpt = load_checkpoint(run_dir / "grpo_epoch3.pt")
        assert interface_of(model_from_checkpoint(ckpt)).kind == kind, name
    assert type(model_from_checkpoint(load_checkpoint(tmp / "hf" / "grpo_epoch3.pt"))).__name__ == "FeatureRanker"
    cfg_ckpt = torch.load(tmp / "cfg_sft.pt", weights_only=True)
    assert cfg_ckpt["model_config"]["kwargs"]["cfg"]["doc_dim"] == 16
    assert cfg_ckpt["model_config"]["sim_temperature"] == 1.0  # the scorer's forward already divides by 0.05


def test_scorer_and_towers_give_the_same_policy_for_the_same_scores():
    """A scorer whose forward is the towers' dot product: identical log-probs to the towers interface, and both
    equal a float64 softmax computed by hand."""
    from custom_models import BilinearRanker

    from v3kit.train.model import INTERFACE_ATTR, resolve_interface

    class DotScorer(BilinearRanker):
        def forward(self, q, c):
            return torch.einsum("bd,bgd->bg", self.encode_query(q), self.encode_candidates(c))

    torch.manual_seed(0)
    towers = BilinearRanker(QD, CD)
    as_scorer = DotScorer(QD, CD)
    as_scorer.load_state_dict(towers.state_dict())
    object.__setattr__(as_scorer, INTERFACE_ATTR, resolve_interface(as_scorer, "scorer"))
    assert interface_of(as_scorer).kind == "scorer" and interface_of(towers).kind == "towers"
    q, c = torch.randn(5, QD), torch.randn(5, 4, CD)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[0, 3] = False
    a = policy_log_probs(towers, q, c, mask, 0.5)
    b = policy_log_probs(as_scorer, q, c, mask, 0.5)
    assert torch.equal(a, b)
    s = (towers.q(q).double().unsqueeze(1) * towers.c(c).double()).sum(-1) / 0.5
    for i in range(5):
        n = int(mask[i].sum())
        ref = s[i, :n] - torch.logsumexp(s[i, :n], 0)
        assert torch.allclose(a[i, :n].double(), ref, atol=1e-5)
        assert torch.isinf(a[i, n:]).all()


def test_constructor_gets_the_dims_only_when_it_names_them():
    class Cfg(nn.Module):
        def __init__(self, cfg: dict) -> None:
            super().__init__()

    class Dims(nn.Module):
        def __init__(self, query_dim: int, cand_dim: int = 3, **kw) -> None:
            super().__init__()

    class Kw(nn.Module):
        def __init__(self, **kw) -> None:
            super().__init__()

    assert constructor_dims(Cfg, 4, 5) == {}
    assert constructor_dims(Dims, 4, 5) == {"query_dim": 4, "cand_dim": 5}
    assert constructor_dims(Kw, 4, 5) == {}
    with pytest.raises(
        ValueError, match=r"could not be built with no feature dims .*its constructor is CfgRanker\(cfg"
    ):
        build_model(ModelConfig(target="examples/any_ranker/models.py:CfgRanker"), QD, CD)


def test_interface_is_recognised_and_can_be_forced(monkeypatch):
    monkeypatch.chdir(REPO)
    t = "examples/any_ranker/models.py:"
    assert interface_of(build_model(ModelConfig(target=t + "CrossEncoder"), QD, CD)).kind == "scorer"
    assert (
        interface_of(
            build_model(
                ModelConfig(target=t + "RenamedTowers", methods={"query": "encode_q", "candidates": "encode_docs"}),
                QD,
                CD,
            )
        ).kind
        == "towers"
    )
    # RenamedTowers has no forward and no encode_query: without methods it is neither
    with pytest.raises(TypeError, match="not an nn.Module with tower methods"):
        build_model(ModelConfig(target=t + "RenamedTowers"), QD, CD)
    with pytest.raises(TypeError, match=r"no method\(s\) \['encode_query', 'encode_candidates'\].*model.methods"):
        build_model(ModelConfig(target=t + "CrossEncoder", interface="towers"), QD, CD)
    with pytest.raises(ValueError, match="model.methods maps"):
        ModelConfig(methods={"qury": "x"})
    with pytest.raises(ValueError, match="model.interface must be one of"):
        ModelConfig(interface="tower")
    # a scorer returning the wrong shape is named
    bad = build_model(ModelConfig(target=t + "CrossEncoder"), QD, CD)
    bad.forward = lambda q, c: torch.zeros(q.shape[0])
    with pytest.raises(ValueError, match=r"a scorer returns one score per candidate, \[B, G\] = \[2, 3\]"):
        scores(bad, torch.zeros(2, QD), torch.zeros(2, 3, CD))


class TempTowers(nn.Module):
    """Towers whose training divided the dot product by a temperature the model holds (forward(...) / 0.05)."""

    def __init__(self, query_dim: int, cand_dim: int) -> None:
        super().__init__()
        self.q, self.c = nn.Linear(query_dim, 8), nn.Linear(cand_dim, 8)
        self.register_buffer("temperature", torch.tensor(0.05))
        self.logit_scale = nn.Parameter(torch.tensor(3.0))  # CLIP's form: scores * exp(3)

    def encode_query(self, x):
        return nn.functional.normalize(self.q(x), dim=-1)

    def encode_candidates(self, x):
        return nn.functional.normalize(self.c(x), dim=-1)


def test_import_reads_the_models_temperature_or_warns_that_the_policy_is_near_uniform(tmp_path, capsys):
    sys.modules[__name__].TempTowers = TempTowers
    target = f"{__file__}:TempTowers"
    torch.save(TempTowers(QD, CD).state_dict(), tmp_path / "v2.pt")
    base = [
        "import-sft",
        "--target",
        target,
        "--state-dict",
        str(tmp_path / "v2.pt"),
        *[a for s in TINY for a in ("--set", s)],
    ]
    assert main([*base, "--out", str(tmp_path / "flat.pt")]) == 0
    out = capsys.readouterr().out
    assert "warning: the imported policy is nearly uniform" in out and "--sim-temperature" in out
    share = float(out.split("mean entropy ")[1].split("%")[0])
    assert share > 95
    assert main([*base, "--out", str(tmp_path / "t.pt"), "--temperature-attr", "temperature"]) == 0
    out = capsys.readouterr().out
    assert "nearly uniform" not in out and "sim_temperature 0.05 read from temperature" in out
    t = torch.load(tmp_path / "t.pt", weights_only=True)["model_config"]["sim_temperature"]
    assert t == pytest.approx(0.05)
    assert (
        main(
            [
                *base,
                "--out",
                str(tmp_path / "s.pt"),
                "--temperature-attr",
                "logit_scale",
                "--temperature-form",
                "log_scale",
            ]
        )
        == 0
    )
    t = torch.load(tmp_path / "s.pt", weights_only=True)["model_config"]["sim_temperature"]
    assert t == pytest.approx(float(torch.exp(torch.tensor(-3.0))))
    assert main([*base, "--out", str(tmp_path / "x.pt"), "--temperature-attr", "tau"]) == 2
    assert "has no attribute 'tau'" in capsys.readouterr().err


class DropoutTowers(nn.Module):
    def __init__(self, query_dim: int, cand_dim: int) -> None:
        super().__init__()
        self.q = nn.Sequential(nn.Linear(query_dim, 16), nn.Dropout(0.3), nn.Linear(16, 8))
        self.c = nn.Sequential(nn.Linear(cand_dim, 16), nn.Dropout(0.3), nn.Linear(16, 8))

    def encode_query(self, x):
        return self.q(x)

    def encode_candidates(self, x):
        return self.c(x)


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_model_step0_ratio_is_exactly_one_with_a_fresh_old_policy(disable):
    torch.manual_seed(0)
    splits = split_by_query(make_world(SyntheticConfig(n_queries=120)), val_frac=0.2, test_frac=0.2, seed=0)
    model = DropoutTowers(splits.train.query_dim, splits.train.cand_dim)
    mc = ModelConfig(disable_dropout=disable)
    stage1 = load_sft(model, splits.train, model_config=mc)
    cfg = GRPOConfig(epochs=1, old_policy="refresh_at_start", batch_size=8)
    result = run_grpo(
        stage1.policy,
        splits,
        stage1.old_log_probs,
        cfg,
        reference=stage1.reference,
        model_config=mc,
        progress=False,
        log_every=1,
    )
    first = result.train_history.iloc[0]  # the first update's ratio, computed in train mode
    if disable:
        assert first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0 and first["ratio_mean"] == 1.0
    else:
        assert first["ratio_max"] - first["ratio_min"] > 0.05  # dropout noise, not a stale old policy


def test_cross_encoder_runs_all_three_stages_on_a_small_table(tmp_path):
    table = tmp_path / "table.jsonl"
    to_long_frame(make_world(SyntheticConfig(n_queries=150))).to_json(table, orient="records", lines=True)
    target = f"{REPO}/examples/any_ranker/models.py:CrossEncoder"
    cfg = tiny_config(
        tmp_path / "run",
        f"data.path={table}",
        f"model.target={target}",
        "sft.epochs=2",
        "rce.epochs=1",
        "grpo.epochs=1",
    )
    from v3kit.pipeline import run_pipeline

    r = run_pipeline(cfg)
    assert list(r.table.index) == ["sft", "rce", "grpo", "selected"] and r.table.notna().all().all()
    assert type(r.models["grpo"]).__name__ == "CrossEncoder"
    assert r.table.loc["grpo", "kl_to_sft"] > 0  # RCE and GRPO moved the scorer


@pytest.mark.slow
def test_printed_next_command_runs_as_printed_in_a_fresh_shell(tmp_path):
    """The user's package beside them, v3kit installed, no PYTHONPATH: import-sft, then its next: line verbatim."""
    project = tmp_path / "project"
    (project / "mypkg").mkdir(parents=True)
    (project / "mypkg" / "__init__.py").write_text("")
    (project / "mypkg" / "models.py").write_text((REPO / "examples" / "any_ranker" / "models.py").read_text())
    (project / "run.yaml").write_text(
        "data: {synthetic: {n_queries: 150}}\nsft: {epochs: 1}\nrce: {epochs: 1}\n"
        "grpo: {epochs: 1}\nprogress: false\nrun_dir: out\n"
    )
    # `v3kit` as installed: this checkout's package on the path, nothing else (python -I drops PYTHONPATH and cwd).
    v3kit = [
        sys.executable,
        "-I",
        "-c",
        f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.argv[0] = 'v3kit'; "
        "from v3kit.cli import main; sys.exit(main())",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    torch.manual_seed(0)
    torch.save(import_object(f"{MODELS}:CrossEncoder")(QD, CD).state_dict(), project / "v2.pt")
    imp = subprocess.run(
        [
            *v3kit,
            "import-sft",
            "--target",
            "mypkg.models:CrossEncoder",
            "--state-dict",
            "v2.pt",
            "--config",
            "run.yaml",
            "--out",
            "sft.pt",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imp.returncode == 0, imp.stderr
    line = next(x for x in imp.stdout.splitlines() if x.startswith("next: "))
    printed = shlex.split(line[len("next: ") :])
    assert printed[0] == "v3kit"
    run = subprocess.run([*v3kit, *printed[1:]], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "held-out test metrics by stage" in run.stdout
    assert (project / "out" / "summary.csv").exists()
    # ... and the hint that run prints: the doctor rebuilds the user's model from the checkpoints, from the cwd
    hint = next(x for x in run.stdout.splitlines() if x.startswith("GRPO health report: "))
    doctor = shlex.split(hint[len("GRPO health report: ") :])
    assert doctor[:2] == ["v3kit", "doctor"]
    report = subprocess.run([*v3kit, *doctor[1:]], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "checks flagged" in report.stdout, report.stdout[-500:]


def test_step0_ratio_mean_far_from_one_is_explained(capsys):
    from v3kit.cli import step0_ratio_note

    assert "old policy is stale" in step0_ratio_note(278928.0) and "temperature" in step0_ratio_note(278928.0)
    assert step0_ratio_note(1.0) == ""


def test_power_line_formats_small_minimum_detectable_effects():
    from v3kit.ablate.report import power_lines

    def frame(mde: float) -> pd.DataFrame:
        return pd.DataFrame({"metric": ["acc@1"], "mde": [mde], "n_queries": [40], "n_seeds": [1], "sft": [0.3]})

    assert "~0.032 go undetected" in power_lines(frame(0.0321), ["acc@1"])[0]
    assert "~0.00042 go undetected" in power_lines(frame(0.000421), ["acc@1"])[0]
    zero = power_lines(frame(0.0), ["acc@1"])[0]
    assert "~0.000" not in zero and "not measurable" in zero and "too few test queries to detect any effect" in zero


def test_checkpoint_data_dim_mismatch_is_reported_before_every_text_is_embedded(tmp_path, monkeypatch, capsys):
    import numpy as np
    from custom_models import BilinearRanker

    from v3kit.train.import_sft import import_sft

    torch.save(BilinearRanker(QD, CD).state_dict(), tmp_path / "v2.pt")
    import_sft("custom_models:BilinearRanker", tmp_path / "v2.pt", tmp_path / "sft.pt", query_dim=QD, cand_dim=CD)
    write_text_table(tmp_path / "table.jsonl", 30, 3)
    seen: list[str] = []

    def fake_encoder(name, max_tokens=None):
        def encode(texts):
            seen.extend(texts)
            return np.ones((len(texts), 3), dtype=np.float32)  # 3-d embeddings: the checkpoint wants 16

        return encode

    monkeypatch.setattr("v3kit.data.text.sentence_encoder", fake_encoder)
    code = main(
        [
            "run",
            "--sft",
            str(tmp_path / "sft.pt"),
            "--set",
            f"data.path={tmp_path / 'table.jsonl'}",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--set",
            f"run_dir={tmp_path / 'run'}",
            "--set",
            "progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "takes features of dim (query 16, candidate 16)" in err and "gives 3-dim embeddings" in err
    assert len(seen) == 1  # one text, not the 120 distinct ones


def test_disable_dropout_covers_modules_and_attention_probabilities():
    from v3kit.train.model import disable_dropout

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_dropout = 0.1  # read at call time, as Hugging Face attention does
            self.mha = nn.MultiheadAttention(8, 2, dropout=0.2)
            self.drop = nn.Dropout(0.3)
            self.size = 0.5  # not a dropout: untouched

    m = Attn()
    assert disable_dropout(m) == 3  # drop.p, attention_dropout, mha.dropout
    assert m.attention_dropout == 0.0 and m.mha.dropout == 0.0 and m.drop.p == 0.0 and m.size == 0.5
    assert disable_dropout(m) == 0


def test_a_model_handed_to_stage_one_uses_the_configs_method_names():
    torch.manual_seed(0)
    splits = split_by_query(make_world(SyntheticConfig(n_queries=60)), val_frac=0.2, test_frac=0.2, seed=0)
    model = import_object(f"{MODELS}:RenamedTowers")(splits.train.query_dim, splits.train.cand_dim)
    mc = ModelConfig(methods={"query": "encode_q", "candidates": "encode_docs"})
    stage1 = load_sft(model, splits.train, model_config=mc)
    b = next(iter(__import__("v3kit.data", fromlist=["iterate_batches"]).iterate_batches(splits.train, 4)))
    expected = torch.log_softmax(model.score(b.query_x, b.cand_x).masked_fill(~b.mask, float("-inf")), dim=-1)
    with torch.no_grad():
        got = policy_log_probs(stage1.policy, *model_inputs(stage1.policy, b), b.mask, 1.0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(stage1.old_log_probs[b.index], expected)
