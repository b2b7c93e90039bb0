"""``v3kit import-sft``: a user's plain state dict -> a v3kit SFT checkpoint; file-path model targets; and what a
run records about the model and SFT checkpoint it started from (examples/my_ranker end to end)."""

from __future__ import annotations

import io
import runpy
import shlex
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, write_text_table
from torch import nn

from v3kit.cli import main
from v3kit.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from v3kit.train.import_sft import StateDictMismatch, import_sft
from v3kit.train.metrics import METRIC_NAMES
from v3kit.train.model import ModelConfig, build_model, import_object

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "my_ranker"
TARGET = f"{EXAMPLE / 'models.py'}:MyTwoTower"
QD, CD = 5, 7


def user_model(dim: int = 4, hidden: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return import_object(TARGET)(query_dim=QD, cand_dim=CD, dim=dim, hidden=hidden)


def do_import(src: Path, out: Path, **kw):
    kw.setdefault("kwargs", {"dim": 4, "hidden": 6})
    return import_sft(TARGET, src, out, query_dim=QD, cand_dim=CD, **kw)


def assert_same_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------------------------------------ success


def test_import_writes_an_sft_checkpoint_that_rebuilds_the_users_model(tmp_path):
    src_model = user_model()
    torch.save(src_model.state_dict(), tmp_path / "v2.pt")
    out = do_import(tmp_path / "v2.pt", tmp_path / "sft.pt", sim_temperature=0.5)

    ckpt = load_checkpoint(out, stage="sft")
    assert (ckpt["query_dim"], ckpt["cand_dim"]) == (QD, CD)
    assert ckpt["model_config"]["target"] == TARGET and ckpt["model_config"]["kwargs"] == {"dim": 4, "hidden": 6}
    assert ckpt["model_config"]["sim_temperature"] == 0.5
    rebuilt = model_from_checkpoint(ckpt, out)
    assert type(rebuilt).__name__ == "MyTwoTower"
    assert_same_weights(rebuilt, src_model.state_dict())
    q, c = torch.randn(3, QD), torch.randn(3, 4, CD)
    assert torch.equal(rebuilt.encode_candidates(c), src_model.encode_candidates(c))
    assert torch.equal(rebuilt.encode_query(q), src_model.encode_query(q))


@pytest.mark.parametrize(
    "wrap, key",
    [
        (lambda sd: {"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, None),
        (lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, None),
        (lambda sd: {"model": nn.DataParallel(_loaded(sd)).state_dict()}, None),  # DataParallel's own "module." keys
        (lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, None),  # torch.compile
        (lambda sd: {"checkpoint": {"ema": sd, "raw": {"x": torch.zeros(1)}}}, "checkpoint.ema"),
        (lambda sd: {**{f"backbone.{k}": v for k, v in sd.items()}, "head.weight": torch.zeros(2)}, "backbone"),
    ],
)
def test_wrappers_and_prefixes_are_unwrapped(tmp_path, wrap, key):
    src_model = user_model(seed=1)
    torch.save(wrap(src_model.state_dict()), tmp_path / "v2.pt")
    out = do_import(tmp_path / "v2.pt", tmp_path / "sft.pt", key=key)
    assert_same_weights(model_from_checkpoint(load_checkpoint(out)), src_model.state_dict())


def _loaded(sd):
    model = user_model(seed=2)
    model.load_state_dict(sd)
    return model


def test_renames_map_the_users_names_onto_the_class(tmp_path):
    src_model = user_model()
    sd = {
        k.replace("user_encoder", "query_net").replace("item_encoder", "doc_net"): v
        for k, v in src_model.state_dict().items()
    }
    torch.save(sd, tmp_path / "v2.pt")
    with pytest.raises(StateDictMismatch) as e:
        do_import(tmp_path / "v2.pt", tmp_path / "sft.pt")
    assert "--rename query_net=user_encoder" in str(e.value) and "--rename doc_net=item_encoder" in str(e.value)
    out = do_import(
        tmp_path / "v2.pt", tmp_path / "sft.pt", renames=[("query_net", "user_encoder"), ("doc_net", "item_encoder")]
    )
    assert_same_weights(model_from_checkpoint(load_checkpoint(out)), src_model.state_dict())
    with pytest.raises(CheckpointError, match="--rename quey_net=user_encoder: no key"):
        do_import(tmp_path / "v2.pt", tmp_path / "sft2.pt", renames=[("quey_net", "user_encoder")])


# ------------------------------------------------------------------------------------------------ failures


def _refused(tmp_path, sd, **kw) -> StateDictMismatch:
    torch.save(sd, tmp_path / "v2.pt")
    with pytest.raises(StateDictMismatch) as e:
        do_import(tmp_path / "v2.pt", tmp_path / "sft.pt", **kw)
    assert not (tmp_path / "sft.pt").exists() and not list(tmp_path.glob(".sft.pt.*"))  # nothing half-written
    return e.value


def test_missing_keys_are_all_listed(tmp_path):
    sd = user_model().state_dict()
    dropped = [k for k in sd if k.startswith("item_encoder.")]  # 7 keys: more than any truncated list shows
    err = _refused(tmp_path, {k: v for k, v in sd.items() if k not in dropped})
    lines = str(err).splitlines()
    assert lines[0].endswith(f"({len(dropped)} missing key(s)); nothing was written")
    assert sorted(err.missing) == sorted(dropped) and not err.unexpected and not err.mismatched
    for k in dropped:
        assert any(line.strip().startswith("missing") and f" {k} " in line for line in lines), k


def test_unexpected_keys_are_listed(tmp_path):
    sd = {**user_model().state_dict(), "head.weight": torch.zeros(3), "head.bias": torch.zeros(1)}
    err = _refused(tmp_path, sd)
    assert err.unexpected == ["head.weight", "head.bias"] and not err.missing
    assert "2 unexpected key(s)" in str(err).splitlines()[0]


def test_shape_mismatches_are_all_listed(tmp_path):
    trained, expected = user_model(dim=8), user_model(dim=4)
    want = sorted(k for k, v in expected.state_dict().items() if v.shape != trained.state_dict()[k].shape)
    err = _refused(tmp_path, trained.state_dict())
    assert sorted(err.mismatched) == want and len(want) == 4  # both towers' out.weight and out.bias
    assert f"{len(want)} shape-mismatched key(s)" in str(err).splitlines()[0]
    assert "user_encoder.out.weight: file (8, 6) vs model (4, 6)" in str(err)


def test_pickled_whole_model_is_refused(tmp_path):
    torch.save(user_model(), tmp_path / "v2.pt")  # the whole module, pickled: weights_only refuses to run it
    with pytest.raises(CheckpointError, match=r"pickled Python objects .*torch.save\(model.state_dict\(\)"):
        do_import(tmp_path / "v2.pt", tmp_path / "sft.pt")
    assert not (tmp_path / "sft.pt").exists()


def test_text_file_and_dict_without_tensors_are_refused(tmp_path):
    (tmp_path / "v2.pt").write_text("query_id,reward\nq1,0.5\n")
    with pytest.raises(CheckpointError, match="is not a PyTorch file torch.load can read"):
        do_import(tmp_path / "v2.pt", tmp_path / "sft.pt")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="name the entry that holds the weights with --key"):
        do_import(tmp_path / "meta.pt", tmp_path / "sft.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        do_import(tmp_path / "nope.pt", tmp_path / "sft.pt")
    assert not (tmp_path / "sft.pt").exists()


def test_cli_prints_the_summary_first_and_exits_2(tmp_path, capsys):
    sd = user_model().state_dict()
    sd.pop("user_encoder.scale")
    torch.save({"model": sd}, tmp_path / "v2.pt")
    rc = main(
        [
            "import-sft",
            "--target",
            TARGET,
            "--state-dict",
            str(tmp_path / "v2.pt"),
            "--query-dim",
            str(QD),
            "--cand-dim",
            str(CD),
            "--kwargs",
            '{"dim": 4, "hidden": 6}',
            "--out",
            str(tmp_path / "sft.pt"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines()[0] == (
        f"v3kit import-sft: error: {tmp_path / 'v2.pt'} does not fit {TARGET} (1 missing key(s)); nothing was written"
    )
    assert "Traceback" not in err and "user_encoder.scale ()" in err
    rc = main(
        ["import-sft", "--target", TARGET, "--state-dict", str(tmp_path / "v2.pt"), "--out", str(tmp_path / "sft.pt")]
    )
    assert rc == 2 and "pass --query-dim and --cand-dim, or --config" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ file-path model.target


def test_relative_file_target_resolves_against_cwd_and_is_stored_absolute(tmp_path, monkeypatch):
    pkg = tmp_path / "proj"
    pkg.mkdir()
    shutil.copy(EXAMPLE / "models.py", pkg / "my_models.py")
    monkeypatch.chdir(tmp_path)
    src_model = user_model()
    torch.save(src_model.state_dict(), "v2.pt")
    out = import_sft(
        "proj/my_models.py:MyTwoTower", "v2.pt", "sft.pt", query_dim=QD, cand_dim=CD, kwargs={"dim": 4, "hidden": 6}
    )
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["target"] == f"{pkg.resolve() / 'my_models.py'}:MyTwoTower"
    monkeypatch.chdir(REPO)  # another working directory: the checkpoint still loads
    assert_same_weights(model_from_checkpoint(load_checkpoint(tmp_path / "sft.pt")), src_model.state_dict())
    (pkg / "my_models.py").rename(pkg / "moved.py")  # the model file moved: the error says what to do
    with pytest.raises(ValueError, match=r"my_models.py does not exist .*import-sft"):
        model_from_checkpoint(load_checkpoint(tmp_path / "sft.pt"))


def test_target_errors_say_how_to_make_the_class_importable(tmp_path):
    with pytest.raises(ValueError, match=r"cannot import module 'mypkg_absent.models'.*PYTHONPATH.*path/to/models.py"):
        build_model(ModelConfig(target="mypkg_absent.models:MyTwoTower"), QD, CD)
    with pytest.raises(ValueError, match=r"file .*absent\.py does not exist"):
        build_model(ModelConfig(target=str(tmp_path / "absent.py") + ":MyTwoTower"), QD, CD)
    (tmp_path / "broken.py").write_text("import not_a_real_dependency_xyz\n")
    with pytest.raises(ValueError, match=r"importing .*broken.py failed \(ModuleNotFoundError"):
        build_model(ModelConfig(target=f"{tmp_path / 'broken.py'}:X"), QD, CD)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        build_model(ModelConfig(target=f"{EXAMPLE / 'models.py'}:Nope"), QD, CD)


# ------------------------------------------------------------- examples/my_ranker end to end, through the CLI


def _table(out: str, first: str) -> list[str]:
    """Column names of the table printed after the line starting with ``first``."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(first))
    return lines[i + 1].split()


def readme_commands(section: str, tmp: Path) -> list[list[str]]:
    """The commands of the first ``bash`` block under README heading ``section``, outputs moved under ``tmp``."""
    text = (REPO / "README.md").read_text().split(f"### {section}\n", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line.replace("runs/my_ranker", str(tmp))) for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """The README's example, its own commands: train_v2.py -> import-sft -> run --sft -> doctor, on a tiny world."""
    tmp = tmp_path_factory.mktemp("my_ranker")
    sets = [a for s in TINY for a in ("--set", s)]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the README runs the example from the repo root (relative --target and --config)
        train, imp = readme_commands("Your v2 checkpoint", tmp)
        run, doctor = readme_commands("Run v3 from it and check its health", tmp)
        assert train[:2] == ["python", "examples/my_ranker/train_v2.py"] and imp[:2] == ["v3kit", "import-sft"]
        assert run[:2] == ["v3kit", "run"] and doctor[:2] == ["v3kit", "doctor"]
        train_v2 = runpy.run_path(str(EXAMPLE / "train_v2.py"))["main"]
        v2 = train_v2([*train[2:], *sets, "--epochs", "2"])
        assert set(torch.load(v2, weights_only=True)) == {"model", "epoch"}
        assert main([*imp[1:], *sets]) == 0
        sft = tmp / "sft.pt"
        run_dir = tmp / "run"
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main([*run[1:], *sets, "--set", f"run_dir={run_dir}"]) == 0
            assert main([*doctor[1:]]) == 0
    return {"tmp": tmp, "sft": sft, "run_dir": run_dir, "run_out": buf.getvalue(), "sets": sets}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the README runs the example from the repo root


def test_example_runs_to_completion_from_the_imported_checkpoint(example_run):
    run_dir = example_run["run_dir"]
    assert (run_dir / "grpo_epoch3.pt").exists() and (run_dir / "summary.csv").exists()
    assert "held-out test metrics by stage" in example_run["run_out"]
    assert "GRPO health report: " + str(run_dir) in example_run["run_out"]  # doctor ran on it
    # config.yaml records the model that ran (the checkpoint's), not the default TwoTower
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model"]["target"] == TARGET
    assert load_checkpoint(run_dir / "grpo_epoch3.pt")["model_config"]["target"] == TARGET


def test_run_and_eval_print_columns_in_metric_names_order(example_run, capsys):
    run_cols = _table(example_run["run_out"], "held-out test metrics")
    assert run_cols == list(METRIC_NAMES)  # the synthetic world has utility, so every metric is there
    assert main(["eval", str(example_run["run_dir"] / "grpo_epoch3.pt")]) == 0
    out = capsys.readouterr().out
    assert _table(out, "test metrics of") == run_cols
    assert "kl_to_sft not shown" not in out


def test_eval_finds_the_recorded_sft_reference_or_says_why_not(example_run, capsys):
    run_dir, tmp = example_run["run_dir"], example_run["tmp"]
    assert not (run_dir / "sft.pt").exists()  # the reference lives outside the run dir: it must come from the record
    # kl_to_sft from eval matches the stage table's (both against the imported SFT at sim_temperature)
    assert main(["eval", str(run_dir / "grpo_epoch3.pt")]) == 0
    out = capsys.readouterr().out
    row = out.splitlines()[-1].split()
    summary = __import__("pandas").read_csv(run_dir / "summary.csv", index_col=0)
    assert float(row[-2]) == pytest.approx(summary.loc["grpo", "kl_to_sft"], abs=1e-4)

    lone = tmp / "lone"  # a checkpoint copied away from its run: nothing says which SFT it started from
    lone.mkdir()
    shutil.copy(run_dir / "grpo_epoch3.pt", lone)
    shutil.copy(run_dir / "config.yaml", lone)
    assert main(["eval", str(lone / "grpo_epoch3.pt")]) == 0
    out = capsys.readouterr().out
    assert "kl_to_sft" not in _table(out, "test metrics of")
    note = [line for line in out.splitlines() if line.startswith("kl_to_sft not shown")]
    assert len(note) == 1 and "--reference" in note[0]
    assert main(["eval", str(lone / "grpo_epoch3.pt"), "--reference", str(example_run["sft"])]) == 0
    assert "kl_to_sft" in _table(capsys.readouterr().out, "test metrics of")


def test_resume_with_the_same_sft_checkpoint_is_accepted(example_run, capsys):
    # config.yaml now holds the checkpoint's model; a resume with the same --sft must still match it
    assert (
        main(
            [
                "run",
                "--config",
                str(EXAMPLE / "config.yaml"),
                *example_run["sets"],
                "--set",
                f"run_dir={example_run['run_dir']}",
                "--sft",
                str(example_run["sft"]),
                "--resume",
            ]
        )
        == 0
    )
    assert "held-out test metrics" in capsys.readouterr().out


def test_notebook_01_accepts_the_imported_checkpoint(example_run, tmp_path):
    from conftest import tiny_config

    from v3kit.pipeline import prepare_data
    from v3kit.stage_reuse import ensure_stage1

    cfg = tiny_config(tmp_path / "nb")
    stage1 = ensure_stage1(cfg, prepare_data(cfg), sft_checkpoint=example_run["sft"])
    assert type(stage1.policy).__name__ == "MyTwoTower"
    assert_same_weights(stage1.reference, load_checkpoint(example_run["sft"])["model"])


def test_cli_reads_the_dims_of_a_text_table_from_its_embeddings(tmp_path, monkeypatch):
    """`--config`/`--set` with a text-only table: the dims are the encoder's, read from the embedding cache the
    run will use (a plain file read would find no feature columns)."""
    import numpy as np

    from v3kit.data.text import embed_texts

    rows = write_text_table(tmp_path / "table.jsonl", 3, 2)
    texts = sorted({r["query_text"] for r in rows} | {r["candidate_text"] for r in rows})

    def fake(batch: list[str]) -> np.ndarray:  # 3-d "embeddings"
        return np.stack([np.full(3, len(t), dtype=np.float32) for t in batch])

    embed_texts(texts, cache_dir=tmp_path / "cache" / "embeddings", encode=fake, max_tokens=128, progress=False)

    def no_encoder(*a, **k):
        raise AssertionError("every text is cached; no encoder may load")

    monkeypatch.setattr("v3kit.data.text.sentence_encoder", no_encoder)
    torch.manual_seed(0)
    v2 = import_object(TARGET)(query_dim=3, cand_dim=3, dim=4, hidden=6)
    torch.save(v2.state_dict(), tmp_path / "v2.pt")
    rc = main(
        [
            "import-sft",
            "--target",
            TARGET,
            "--state-dict",
            str(tmp_path / "v2.pt"),
            "--kwargs",
            '{"dim": 4, "hidden": 6}',
            "--set",
            f"data.path={tmp_path / 'table.jsonl'}",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--set",
            "data.text_max_tokens=128",
            "--out",
            str(tmp_path / "sft.pt"),
        ]
    )
    assert rc == 0
    ckpt = load_checkpoint(tmp_path / "sft.pt")
    assert (ckpt["query_dim"], ckpt["cand_dim"]) == (3, 3)
