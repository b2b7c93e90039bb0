"""Hostile inputs and environments: YAML bombs, absurd sizes, NaN weights, damaged caches, a full disk.

Every case ends in one line on stderr and exit code 2 (no traceback, nothing partial left), or in a rebuild with a
one-line note. CLI cases run ``v3kit.cli.main`` in-process (a subprocess would cost a torch import per case).
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from v3kit.cli import main

SET_TINY = [a for kv in TINY for a in ("--set", kv)]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    """Temp files (atomic_write's ``.<name>.*.tmp``) and cache build dirs under ``directory``."""
    return sorted(str(p) for p in directory.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".building"))


# ============================================================================================== config bounds
BOMB = """model:
  kwargs:
    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_yaml_bomb_config_fails_fast_in_one_line(tmp_path, capsys):
    path = tmp_path / "b.yaml"
    path.write_text(BOMB)
    start = time.perf_counter()
    code, _, err = cli(capsys, "run", "--config", str(path), "--set", f"run_dir={tmp_path / 'run'}")
    assert time.perf_counter() - start < 5  # was: no output for 300 s, 6.5 GB and growing
    line = one_line(err)
    assert code == 2 and str(path) in line and "aliases" in line and "100_000" in line
    assert not (tmp_path / "run").exists()


def test_yaml_alias_expansion_is_counted_exactly_and_small_aliases_still_load(tmp_path):
    from v3kit.config import MAX_YAML_NODES, ConfigError, load_config, safe_load_bounded

    # an anchor reused a few times (handy in grids) loads as plain YAML would
    text = "base: &b {grpo: {kl_beta: 0.1}}\nx: *b\ny: [*b, *b]\n"
    assert safe_load_bounded(text, "t") == __import__("yaml").safe_load(text)
    # a list of n aliases to a list of k scalars expands to 1 + n * (1 + k) nodes (+ the mapping and keys)
    k = 99
    largest = (MAX_YAML_NODES - 5 - k) // (k + 1)
    for n, ok in ((largest, True), (largest + 1, False)):
        doc = "a: &a [" + ", ".join(["1"] * k) + "]\nb: [" + ", ".join(["*a"] * n) + "]\n"
        expanded = 1 + 2 + (1 + k) + 1 + n * (1 + k)  # map, 2 keys, a's list, b's list, n copies of a
        assert (expanded <= MAX_YAML_NODES) == ok
        if ok:
            assert len(safe_load_bounded(doc, "t")["b"]) == n
        else:
            with pytest.raises(ConfigError, match=f"expands to {expanded:_} nodes"):
                safe_load_bounded(doc, "t")
    # a self-referencing alias, in a file and in a --set value
    (tmp_path / "r.yaml").write_text("model:\n  kwargs: &a\n    x: *a\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(tmp_path / "r.yaml")
    levels = ["a: &a [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]
    sizes = [10]  # each level: its list node + 9 copies of the level below
    for _ in range(8):
        sizes.append(1 + 9 * sizes[-1])
    total = 1 + 9 + sum(sizes)  # the mapping, its 9 keys, its 9 values
    with pytest.raises(ConfigError, match=f"override 'model.kwargs' expands to {total:_} nodes"):
        load_config(None, ["model.kwargs={" + ", ".join(levels) + "}"])


def test_yaml_bomb_grid_fails_fast_in_one_line(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text("seeds: [0]\nbase:\n  " + BOMB.replace("\n", "\n  ") + "\nvariants: {a: {}}\n")
    code, _, err = cli(capsys, "ablate", "--grid", str(path), "--out", str(tmp_path / "out"))
    line = one_line(err)
    assert code == 2 and str(path) in line and "aliases" in line


@pytest.mark.parametrize(
    "override, key, bound",
    [
        ("sft.epochs=100000000000000000000", "sft.epochs", "10_000"),
        ("grpo.epochs=10001", "grpo.epochs", "10_000"),
        ("rce.batch_size=1000001", "rce.batch_size", "1_000_000"),
        ("model.emb_dim=1000000000000", "model.emb_dim", "1_000_000"),
        ("model.hidden=[64,2000000]", "model.hidden", "1_000_000"),
        ("data.synthetic.n_queries=100000001", "data.synthetic.n_queries", "100_000_000"),
        ("data.synthetic.group_size=100001", "data.synthetic.group_size", "100_000"),
        ("data.synthetic.feature_dim=1000001", "data.synthetic.feature_dim", "1_000_000"),
        ("grpo.num_samples=100001", "grpo.num_samples", "100_000"),
    ],
)
def test_absurd_sizes_are_refused_naming_key_and_bound(tmp_path, capsys, override, key, bound):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--set", override, "--set", f"run_dir={run}", "--set", "progress=false")
    line = one_line(err)
    assert code == 2 and line.startswith(f"v3kit run: error: {key} must be <= {bound}, got "), line
    assert not run.exists()  # refused at load time: no run dir, no checkpoint


def test_sizes_at_the_bound_are_accepted():
    from v3kit.config import load_config

    cfg = load_config(
        None,
        ["sft.epochs=10000", "model.emb_dim=1000000", "grpo.batch_size=1000000", "data.synthetic.n_queries=100000000"],
    )
    assert (cfg.sft.epochs, cfg.model.emb_dim, cfg.grpo.batch_size) == (10_000, 1_000_000, 1_000_000)


def test_a_model_too_big_for_memory_fails_before_training_naming_the_keys(tmp_path, capsys):
    run = tmp_path / "run"
    # each width is in bounds, together they make 1e12 parameters
    code, _, err = cli(capsys, "run", "--set", "model.hidden=[1000000,1000000]", "--set", f"run_dir={run}", *SET_TINY)
    line = one_line(err)
    assert code == 2 and "model.hidden / model.emb_dim" in line and "parameters" in line and "available" in line
    assert not (run / "config.yaml").exists() and not list(run.glob("*.pt"))


def test_memory_check_uses_the_exact_parameter_count(monkeypatch):
    from v3kit.train.model import ModelConfig, build_model
    from v3kit.train.model_size import TRAIN_BYTES_PER_PARAM, check_model_fits, count_params

    cfg = ModelConfig(hidden=[64, 48], emb_dim=32)
    n = sum(p.numel() for p in build_model(cfg, 16, 12).parameters())
    by_hand = (16 * 64 + 64 + 64 * 48 + 48 + 48 * 32 + 32) + (12 * 64 + 64 + 64 * 48 + 48 + 48 * 32 + 32)
    assert count_params(cfg, 16, 12) == n == by_hand
    monkeypatch.setenv("V3KIT_TEST_AVAILABLE_MEMORY", str(n * TRAIN_BYTES_PER_PARAM))
    check_model_fits(cfg, 16, 12)  # exactly fits
    monkeypatch.setenv("V3KIT_TEST_AVAILABLE_MEMORY", str(n * TRAIN_BYTES_PER_PARAM - 1))
    with pytest.raises(ValueError, match="model.hidden / model.emb_dim"):
        check_model_fits(cfg, 16, 12)


def test_memory_check_on_cuda_reads_the_devices_free_memory(monkeypatch):
    from v3kit.bounds import available_memory, require_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 8 << 30))  # no GPU needed
    assert available_memory("cuda:0") == 3 << 30
    require_memory(3 << 30, "x", "fix", "cuda:0")
    with pytest.raises(ValueError, match=r"^x needs about 3\.0 GB of memory but cuda has 3\.0 GB available; fix$"):
        require_memory((3 << 30) + 1, "x", "fix", "cuda:0")
    assert available_memory("mps") is None  # unknown: never refused on a guess


def test_a_synthetic_world_too_big_for_memory_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("V3KIT_TEST_AVAILABLE_MEMORY", str(1 << 30))
    code, _, err = cli(
        capsys,
        "run",
        "--set",
        "data.synthetic.n_queries=10000000",
        "--set",
        "data.synthetic.feature_dim=1000",
        "--set",
        f"run_dir={tmp_path / 'run'}",
    )
    line = one_line(err)
    assert code == 2 and "data.synthetic" in line and "n_queries" in line and "1.0 GB available" in line


# ============================================================================================== NaN weights
def _nan_state(model: torch.nn.Module, names=None) -> dict:
    state = model.state_dict()
    for k in names or state:
        state[k] = torch.full_like(state[k], float("nan"))
    return state


def test_import_sft_refuses_nan_weights_naming_them_and_writes_nothing(tmp_path, capsys):
    from v3kit.train.model import ModelConfig, build_model

    model = build_model(ModelConfig(), 4, 4)
    torch.save(_nan_state(model), tmp_path / "nan_sd.pt")
    out = tmp_path / "sft.pt"
    code, _, err = cli(
        capsys,
        "import-sft",
        "--target",
        "v3kit.model:TwoTower",
        "--state-dict",
        str(tmp_path / "nan_sd.pt"),
        "--out",
        str(out),
        "--query-dim",
        "4",
        "--cand-dim",
        "4",
    )
    line = one_line(err)
    n = len(model.state_dict())
    assert code == 2 and "non-finite" in line and "query_tower.0.weight" in line and f"({n} tensors)" in line
    assert not out.exists() and not leftovers(tmp_path)
    # one inf bias is named alone
    state = model.state_dict()
    state["cand_tower.2.bias"][1] = float("-inf")
    torch.save(state, tmp_path / "inf_sd.pt")
    code, _, err = cli(
        capsys,
        "import-sft",
        "--target",
        "v3kit.model:TwoTower",
        "--state-dict",
        str(tmp_path / "inf_sd.pt"),
        "--out",
        str(out),
        "--query-dim",
        "4",
        "--cand-dim",
        "4",
    )
    assert code == 2 and "in cand_tower.2.bias;" in one_line(err) and not out.exists()


def _nan_checkpoint(tmp_path: Path, names=None) -> Path:
    from v3kit.train.checkpoint import model_payload, save_checkpoint
    from v3kit.train.model import ModelConfig, build_model

    cfg = ModelConfig()
    model = build_model(cfg, 16, 16)
    payload = {"stage": "sft", "epoch": 1, "step": -1, "model": _nan_state(model, names), **model_payload(cfg, 16, 16)}
    return save_checkpoint(tmp_path / "nan_weights.pt", payload)


def test_eval_refuses_nan_weights(tmp_path, capsys):
    path = _nan_checkpoint(tmp_path, ["query_tower.0.weight"])
    code, out, err = cli(capsys, "eval", str(path), *SET_TINY)
    line = one_line(err)
    assert code == 2 and str(path) in line and "query_tower.0.weight" in line and "acc@1" not in out


def test_run_sft_refuses_nan_weights_before_writing_anything(tmp_path, capsys):
    path = _nan_checkpoint(tmp_path)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--sft", str(path), "--set", f"run_dir={run}", *SET_TINY)
    line = one_line(err)
    assert code == 2 and str(path) in line and "non-finite" in line
    assert not run.exists()


def test_a_minus_inf_buffer_is_not_a_non_finite_weight():
    from v3kit.train.checkpoint import nonfinite_tensors

    state = {"w": torch.ones(2), "mask": torch.tensor([0.0, float("-inf")]), "steps": torch.tensor(3)}
    assert nonfinite_tensors(state) == ["mask"]
    assert nonfinite_tensors(state, names={"w"}) == []  # only parameters are weights


# ============================================================================================== data cache
@pytest.fixture()
def data_file(tmp_path):
    from v3kit.data import to_long_frame
    from v3kit.data.synthetic import SyntheticConfig, make_world

    path = tmp_path / "data.parquet"
    to_long_frame(make_world(SyntheticConfig(n_queries=240, seed=4))).to_parquet(path)
    return path


def _splits(data_file: Path, cache: bool):
    from v3kit.config import load_config
    from v3kit.pipeline import prepare_data

    return prepare_data(load_config(None, [f"data.path={data_file}", f"data.cache={str(cache).lower()}"]))


def _same_splits(a, b) -> None:
    for part in ("train", "val", "test"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.query_ids == y.query_ids
        for name in ("query_x", "cand_x", "mask", "labels", "rewards", "utility"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (part, name)


def _cache(data_file: Path) -> Path:
    return data_file.parent / (data_file.name + ".v3kit-cache") / "float32"


def _split_dir(data_file: Path) -> Path:
    return next(_cache(data_file).glob("split-*"))


def _edit_keeping_size_and_mtime(path: Path, value: float) -> None:
    """Overwrite one float32 feature in place: same size, same mtime (what no stat check can see)."""
    st = path.stat()
    arr = np.load(path, mmap_mode="r+")
    arr.reshape(-1)[5] = value
    arr.flush()
    del arr
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize(
    "damage",
    [
        "delete cand_x.npy",
        "delete mask.npy",
        "delete split train_cand_x.npy",
        "truncate split val_mask.npy",
        "edit cand_x.npy finite",
        "edit cand_x.npy nan",
        "edit split train_cand_x.npy finite",
        "bad meta.json",
        "empty split done",
    ],
)
def test_damaged_data_cache_is_rebuilt_with_a_note_never_trained_on(data_file, capsys, damage):
    reference = _splits(data_file, cache=False)
    _same_splits(_splits(data_file, cache=True), reference)  # built
    capsys.readouterr()
    action, name = damage.split()[0], damage.split()[-2 if damage.endswith(("finite", "nan")) else -1]
    in_split = " split " in damage
    if not in_split:  # the packed arrays are read only when a split is built: drop the split to need them
        shutil.rmtree(_split_dir(data_file))
    where = _split_dir(data_file) if in_split else _cache(data_file)
    target = where / name
    if action == "delete":
        target.unlink()
    elif action == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif action == "edit":
        _edit_keeping_size_and_mtime(target, float("nan") if damage.endswith("nan") else 0.123)
    elif name == "meta.json":
        target.write_text('{"version": 2')
    else:
        target.write_text("")
    got = _splits(data_file, cache=True)
    note = one_line(capsys.readouterr().err)
    assert note.startswith("v3kit: note: data cache damaged: ") and "rebuilding" in note and name in note, note
    _same_splits(got, reference)
    assert not leftovers(data_file.parent)
    _splits(data_file, cache=True)  # repaired: the next load is quiet
    assert capsys.readouterr().err == ""


def test_cli_run_over_a_damaged_cache_trains_on_the_rebuilt_data(data_file, tmp_path, capsys):
    common = [
        "--set",
        f"data.path={data_file}",
        "--set",
        "data.cache=true",
        *SET_TINY,
        "--set",
        "sft.epochs=1",
        "--set",
        "rce.epochs=1",
        "--set",
        "grpo.epochs=1",
    ]
    assert cli(capsys, "run", "--set", f"run_dir={tmp_path / 'a'}", *common)[0] == 0
    (_split_dir(data_file) / "train_cand_x.npy").unlink()  # was: TypeError ... missing 'cand_x'
    code, _, err = cli(capsys, "run", "--set", f"run_dir={tmp_path / 'b'}", *common)
    assert code == 0 and "train_cand_x.npy is missing" in one_line(err)
    assert (tmp_path / "a" / "summary.csv").read_text() == (tmp_path / "b" / "summary.csv").read_text()


def test_a_killed_cache_build_is_cleaned_up_by_the_next_build_not_a_live_one(data_file):
    parent = _cache(data_file).parent
    parent.mkdir()
    dead, live = parent / ".building-999999999-abc", parent / f".building-{os.getpid()}-xyz"
    for d in (dead, live):
        d.mkdir()
        (d / "cand_x.npy").write_bytes(b"half")
    _splits(data_file, cache=True)
    assert not dead.exists() and live.exists()


def test_checksum_is_written_with_each_array_and_matches_an_independent_crc(data_file):
    import json
    import zlib

    _splits(data_file, cache=True)
    meta = json.loads((_cache(data_file) / "meta.json").read_text())
    done = json.loads((_split_dir(data_file) / "done").read_text())
    for where, files in ((_cache(data_file), meta["files"]), (_split_dir(data_file), done["files"])):
        on_disk = {p.name for p in where.glob("*.npy")}
        assert set(files) == on_disk
        for name, want in files.items():
            data = (where / name).read_bytes()
            assert want == {"bytes": len(data), "crc32": zlib.crc32(data)}


# ============================================================================================== embedding cache
class Encoder:
    def __init__(self, dim: int = 6) -> None:
        self.dim, self.seen = dim, []

    def __call__(self, texts):
        self.seen += texts
        return np.stack([np.full(self.dim, len(t), dtype=np.float32) + np.arange(self.dim) for t in texts])


@pytest.mark.parametrize(
    "damage", ["10-d vectors", "float64 vectors", "one vector short", "edited value", "not an npz", "no checksum"]
)
def test_damaged_embedding_shard_is_rebuilt_with_a_note(tmp_path, capsys, damage):
    from v3kit.data.text import embed_texts

    texts = ["sort a list", "read a file", "join two paths"]
    want = embed_texts(texts, encoder_name="enc", cache_dir=tmp_path, encode=Encoder(), progress=False)
    (shard,) = (tmp_path / "enc").glob("shard-*.npz")
    with np.load(shard) as z:
        hashes, vectors, checksum = z["hashes"], z["vectors"], z["checksum"]
    if damage == "10-d vectors":  # what the probe did: other vectors, same texts
        np.savez(shard, hashes=hashes, vectors=np.ones((len(hashes), 10), np.float32), checksum=checksum)
    elif damage == "float64 vectors":
        np.savez(shard, hashes=hashes, vectors=vectors.astype(np.float64), checksum=checksum)
    elif damage == "one vector short":
        np.savez(shard, hashes=hashes, vectors=vectors[:-1], checksum=checksum)
    elif damage == "edited value":
        vectors[1, 2] += 1
        np.savez(shard, hashes=hashes, vectors=vectors, checksum=checksum)
    elif damage == "not an npz":
        shard.write_bytes(b"garbage")
    else:
        np.savez(shard, hashes=hashes, vectors=vectors)
    capsys.readouterr()
    again = Encoder()
    got = embed_texts(texts, encoder_name="enc", cache_dir=tmp_path, encode=again, progress=False)
    note = one_line(capsys.readouterr().err)
    assert note.startswith("v3kit: note: embedding cache shard") and shard.name in note and "embedded again" in note
    np.testing.assert_array_equal(got, want)
    assert sorted(again.seen) == sorted(texts)  # rebuilt, not trusted
    embed_texts(texts, encoder_name="enc", cache_dir=tmp_path, encode=Encoder(), progress=False)
    assert capsys.readouterr().err == ""  # the rebuilt shard is good


def test_many_bad_shards_make_one_note(tmp_path, capsys):
    from v3kit.data.text import embed_texts

    texts = ["a", "bb", "ccc"]
    want = embed_texts(texts, encoder_name="enc", cache_dir=tmp_path, encode=Encoder(), batch_size=1, progress=False)
    shards = sorted((tmp_path / "enc").glob("shard-*.npz"))
    assert len(shards) == 3
    for shard in shards:  # as an older v3kit wrote them: no checksum
        with np.load(shard) as z:
            np.savez(shard, hashes=z["hashes"], vectors=z["vectors"])
    capsys.readouterr()
    got = embed_texts(texts, encoder_name="enc", cache_dir=tmp_path, encode=Encoder(), progress=False)
    note = one_line(capsys.readouterr().err)
    assert "no checksum: written by an older v3kit" in note and "and 2 more" in note, note
    np.testing.assert_array_equal(got, want)


# ============================================================================================== full disk
class FullDisk:
    """A filesystem under ``root`` with ``budget`` bytes left for files whose name ``counts``: a write past it writes
    what fits, then fails with ENOSPC, as a real full disk does. Patches ``os.fdopen`` (atomic_write's temp files)
    and ``os.write`` (the metrics appends); anything outside ``root`` is untouched."""

    def __init__(self, monkeypatch, root: Path, budget: int, counts=lambda name: True) -> None:
        self.root, self.budget, self.counts = str(root), budget, counts
        self.fails = 0
        real_fdopen, real_write = os.fdopen, os.write
        disk = self

        class File:
            def __init__(self, f) -> None:
                self._f = f

            def write(self, data) -> int:
                return disk.take(len(data), lambda n: self._f.write(bytes(memoryview(data)[:n])))

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __iter__(self):
                return iter(self._f)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        def fdopen(fd, *a, **kw):
            f = real_fdopen(fd, *a, **kw)
            return File(f) if self._hit(fd) else f

        def write(fd, data):
            if not self._hit(fd):
                return real_write(fd, data)
            return self.take(len(data), lambda n: real_write(fd, bytes(memoryview(data)[:n])), partial=True)

        real_open = builtins.open

        def open_(file, mode="r", *a, **kw):  # np.save, open_memmap, json dumps to a path
            f = real_open(file, mode, *a, **kw)
            return File(f) if any(c in mode for c in "wax+") and self._hit(f.fileno()) else f

        monkeypatch.setattr(os, "fdopen", fdopen)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(builtins, "open", open_)

    def _hit(self, fd: int) -> bool:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        return path.startswith(self.root) and self.counts(Path(path).name)

    def take(self, n: int, do, partial: bool = False) -> int:
        if n <= self.budget:
            self.budget -= n
            return do(n)
        fit, self.budget = self.budget, 0
        if fit and partial:
            return do(fit)  # os.write: a short write, the next call fails
        if fit:
            do(fit)
        self.fails += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="FullDisk finds fds' paths in /proc")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted tiny run: what a run resumed after a full disk must equal."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", "--set", f"run_dir={run}", *SET_TINY]) == 0
    return run


def _assert_resumes_to_reference(capsys, run: Path, reference_run: Path) -> None:
    code, _, err = cli(capsys, "run", "--set", f"run_dir={run}", *SET_TINY, "--resume")
    assert code == 0, err
    for name in ("summary.csv", "metrics.csv"):
        assert (run / name).read_text() == (reference_run / name).read_text(), name
    a, b = torch.load(run / "grpo_epoch3.pt"), torch.load(reference_run / "grpo_epoch3.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@needs_proc
@pytest.mark.parametrize("which", ["checkpoint", "metrics append", "config.yaml", "summary.csv"])
def test_full_disk_ends_in_one_line_leaves_nothing_partial_and_resumes(
    tmp_path, capsys, monkeypatch, which, reference_run
):
    run = tmp_path / "run"
    counts, budget = {  # which writes fill the disk, and how many bytes they get first
        "checkpoint": (lambda n: ".pt." in n, 150_000),  # sft_epoch1.pt fits, sft_epoch2.pt does not
        "metrics append": (lambda n: n == "metrics.csv", 3_000),  # the rewrites go through temp files: not counted
        "config.yaml": (lambda n: ".config.yaml." in n, 100),
        "summary.csv": (lambda n: ".summary.csv." in n, 10),
    }[which]
    disk = FullDisk(monkeypatch, run, budget, counts)
    code, _, err = cli(capsys, "run", "--set", f"run_dir={run}", *SET_TINY)
    line = one_line(err)
    name = {
        "checkpoint": "sft_epoch2.pt",
        "metrics append": "metrics.csv",
        "config.yaml": "config.yaml",
        "summary.csv": "summary.csv",
    }[which]
    assert code == 2 and disk.fails == 1, line
    assert line.startswith(f"v3kit run: error: {run / name}: no space left on device ("), line
    assert line.endswith("free space, then `--resume` (or point run_dir at another disk)"), line
    if which != "metrics append":
        assert "needs about" in line
    assert not leftovers(run)  # the temp file is gone
    if which == "checkpoint":
        assert not (run / "sft_epoch2.pt").exists()
    if (run / "metrics.csv").exists():  # no torn row: every line is complete
        text = (run / "metrics.csv").read_text()
        assert text.endswith("\n") and len({len(r.split(",")) for r in text.splitlines()}) == 1
    monkeypatch.undo()  # space freed
    _assert_resumes_to_reference(capsys, run, reference_run)


@needs_proc
def test_a_data_cache_on_a_full_disk_loads_without_it_with_a_note(data_file, capsys, monkeypatch):
    reference = _splits(data_file, cache=False)
    FullDisk(monkeypatch, data_file.parent, 10_000)  # the first arrays fit, then the disk is full
    got = _splits(data_file, cache=True)
    note = one_line(capsys.readouterr().err)
    assert note.startswith("v3kit: note: cannot write the data cache") and "without it" in note, note
    _same_splits(got, reference)
    assert not leftovers(data_file.parent)


def test_temp_files_of_a_killed_run_are_removed_at_the_next_start(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".sft_epoch2.pt.k3j4l5.tmp", run / ".metrics.csv.x8y9.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = run / ".notes.txt"  # not ours: left alone
    keep.write_text("x")
    assert (
        cli(
            capsys,
            "run",
            "--set",
            f"run_dir={run}",
            *SET_TINY,
            "--set",
            "sft.epochs=1",
            "--set",
            "rce.epochs=0",
            "--set",
            "grpo.epochs=1",
        )[0]
        == 0
    )
    assert not any(p.exists() for p in stale) and keep.exists()


def _can_mount_tmpfs(where: Path) -> bool:
    if sys.platform != "linux" or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(where)], capture_output=True).returncode
        == 0
    )
    return ok


def test_a_real_full_tmpfs_run_dir(tmp_path, capsys, reference_run):
    """The probe's reproduction on a real 300 KB tmpfs (where this machine lets the test mount one)."""
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC tests cover the same paths")
    try:
        run = mnt / "run"
        code, _, err = cli(capsys, "run", "--set", f"run_dir={run}", *SET_TINY)
        line = one_line(err)
        assert code == 2 and "no space left on device" in line and "free space, then `--resume`" in line, line
        assert not leftovers(run)
        subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)  # space freed
        _assert_resumes_to_reference(capsys, run, reference_run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_embedding_cache_on_a_full_disk_keeps_the_vectors_for_the_run(tmp_path, capsys, monkeypatch):
    from v3kit.data.text import embed_texts

    FullDisk(monkeypatch, tmp_path, 0)
    got = embed_texts(["a", "bb"], encoder_name="enc", cache_dir=tmp_path, encode=Encoder(), progress=False)
    assert got.shape == (2, 6)
    assert "not cached" in one_line(capsys.readouterr().err)
    assert not leftovers(tmp_path) and not list(tmp_path.rglob("shard-*"))


# ============================================================================================== the docs' table
def test_every_test_the_reliability_page_names_exists():
    """docs/reliability.md cites tests by name (``tests/file.py::name``, then ``::name`` in the same cell): each
    must exist, so the table never vouches with a test that was renamed away."""
    import ast
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "reliability.md").read_text()
    cited = 0
    for row in (r for r in text.splitlines() if r.startswith("| ")):
        current = None
        for file, name in re.findall(r"`(?:(tests/[\w/]+\.py))?::(\w+)", row):
            current = file or current
            assert current is not None, row
            tree = ast.parse((root / current).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{current}::{name} is cited in docs/reliability.md but does not exist"
            cited += 1
    assert cited >= 15
