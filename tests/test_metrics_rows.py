"""The rows an epoch checkpoint stores (``MetricsLog.packed_stage_rows``): one JSON text that gives every logged
value back exactly, and a resume rebuilds ``metrics.csv`` from it, or from the list of dicts older checkpoints hold,
to the same bytes."""

from __future__ import annotations

import json
import math
import random

import pytest

from v3kit.train.metrics_log import MetricsLog

ROWS = [
    {"stage": "grpo", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.1 + 0.2, "kl": math.nan},
    {"stage": "grpo", "split": "train", "epoch": 1, "step": 1, "loss": -1e-300, "grad_norm": math.inf, "flag": True},
    {"stage": "grpo", "split": "train", "epoch": 1, "step": 2, "loss": 5e-324, "note": 'a "quoted", comma', "x": None},
]


def _logged(tmp_path, name: str) -> MetricsLog:
    log = MetricsLog(tmp_path / name)
    (tmp_path / name).mkdir()
    log.start_stage("sft", [{"stage": "sft", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.5}])
    log.start_stage("grpo", [])
    for row in ROWS:
        log.add(dict(row))
    return log


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def test_packed_rows_give_every_value_back_with_its_type(tmp_path):
    log = _logged(tmp_path, "run")
    packed = log.packed_stage_rows("grpo")
    assert isinstance(packed, str)
    fresh = MetricsLog(tmp_path / "run")
    fresh.start_stage("grpo", packed, 1)
    back = fresh.stage_rows("grpo")
    assert [list(r) for r in back] == [list(r) for r in ROWS]  # the same keys in the same order
    for got, want in zip(back, ROWS):
        assert all(_same(got[k], want[k]) for k in want), (got, want)


def test_a_resume_from_packed_rows_or_from_a_list_writes_the_same_file(tmp_path):
    log = _logged(tmp_path, "run")
    text = (tmp_path / "run" / "metrics.csv").read_bytes()
    for form in (log.packed_stage_rows("grpo"), log.stage_rows("grpo")):  # new checkpoints, older checkpoints
        again = MetricsLog(tmp_path / "run")
        again.start_stage("grpo", form, 1)
        again.close()
        assert (tmp_path / "run" / "metrics.csv").read_bytes() == text


def test_rows_holding_other_values_stay_a_list():
    log = MetricsLog(None)
    log.add(
        {"stage": "rce", "split": "train", "epoch": 1, "step": 1, "shape": (2, 3)}
    )  # a tuple would come back a list
    assert log.packed_stage_rows("rce") == log.stage_rows("rce")


def test_packed_rows_follow_rows_added_after_a_pack_and_a_restart_of_the_stage(tmp_path):
    log = _logged(tmp_path, "run")
    log.packed_stage_rows("grpo")  # encodes the rows so far once
    log.add({"stage": "grpo", "split": "train", "epoch": 2, "step": 3, "loss": 0.25})
    assert log.packed_stage_rows("grpo") == json.dumps(log.stage_rows("grpo"))
    assert log.packed_stage_rows("grpo") == json.dumps(log.stage_rows("grpo"))  # nothing new: the same text
    log.add_many([{"stage": "grpo", "split": "train", "epoch": 2, "step": s, "loss": s / 7} for s in (4, 5, 6)])
    assert log.packed_stage_rows("grpo") == json.dumps(log.stage_rows("grpo"))
    log.start_stage("grpo", [{"stage": "grpo", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.75}])
    assert json.loads(log.packed_stage_rows("grpo")) == log.stage_rows("grpo")


def test_packed_rows_scan_only_new_rows_yet_match_a_full_scan_whatever_happens_between(tmp_path):
    """Packing scans only the rows added since its last call; rows of other stages in between, another stage's
    restart (which rebuilds the row list) and a reload from the file must still give every row of the stage."""
    log = _logged(tmp_path, "run")
    rng = random.Random(1)
    for i in range(200):
        what = rng.choice(["grpo", "grpo", "sft", "rce", "nothing", "restart_rce", "reload"])  # then pack both
        if what in ("grpo", "sft", "rce"):
            log.add_many([{"stage": what, "split": "train", "epoch": 9, "step": i, "loss": i / 3}] * rng.choice([1, 2]))
        elif what == "restart_rce":
            kept = [{"stage": "rce", "split": "val", "epoch": 0, "step": 0, "acc@1": i / 9}] * rng.choice([0, 1, 2])
            log.start_stage("rce", kept)  # the rce block shrinks or grows: later rows move
        elif what == "reload":
            log.close()
            log = MetricsLog(tmp_path / "run")
        for stage in ("grpo", "sft"):
            assert log.packed_stage_rows(stage) == json.dumps(log.stage_rows(stage)), (i, what, stage)


def test_metrics_csv_stays_exact_as_rows_bring_new_columns(tmp_path):
    """The file after every add/add_many equals the rows formatted from scratch (new columns pad the cached lines
    of earlier rows; cells with commas, quotes and newlines included), read back with the csv module."""
    import csv
    import random

    rng = random.Random(0)
    log = MetricsLog(tmp_path)
    log.start_stage("sft", [])
    rows: list[dict] = []
    for i in range(60):
        batch = []
        for j in range(rng.choice([1, 1, 3])):
            row = {"stage": "sft", "split": rng.choice(["train", "val"]), "epoch": i, "step": i * 3 + j}
            for name in rng.sample(["loss", "kl", 'a "q", b', "note\nx", f"col{i % 7}", f"late{i // 20}"], 3):
                row[name] = rng.choice([rng.random(), -1, math.nan, None, "x,y", 'say "hi"'])
            batch.append(row)
        if len(batch) == 1 and rng.random() < 0.5:
            log.add(batch[0])
        else:
            log.add_many(batch)
        rows += batch
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        with open(tmp_path / "metrics.csv", newline="") as f:
            got = list(csv.reader(f))
        from v3kit.train.metrics_log import _cell

        assert got[0] == columns
        assert got[1:] == [[_cell(r.get(c)) for c in columns] for r in rows]


def _csv_writer_line(cells: list[str]) -> str:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


def _parse_by_trial(text: str) -> object:
    if text == "":
        return math.nan
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_fast_cell_formatting_and_parsing_equal_the_csv_writer_and_plain_trials():
    """The fast paths of a metrics.csv line and of reading a cell back give what ``csv.writer`` and trying int()
    then float() give, on random text built from the characters that decide them (quotes, commas, line breaks,
    signs, points, exponents, underscores, non-ASCII digits)."""
    import random

    from v3kit.train.metrics_log import _csv_line, _parse_cell

    rng = random.Random(0)
    alphabet = list('a1-.eE,"\n\r _+nif9٣')
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        assert _same(_parse_cell(text), _parse_by_trial(text)), text
        cells = [
            text,
            *("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(0, 4))),
        ]
        assert _csv_line(cells) == _csv_writer_line(cells), cells
    for value in (0.1 + 0.2, -1e-300, 5e-324, 1e22, -7, 12345678901234567890):
        assert _same(_parse_cell(repr(value)), value)


def test_commit_later_survives_a_rewrite_and_closes_its_descriptor(tmp_path, monkeypatch):
    """The stacked trainer's writer thread fsyncs a member's rows with ``commit_later()``: it syncs a duplicate of
    the append descriptor taken when it was asked for (a rewrite for new columns in between replaces the file and
    closes the original), and closes that duplicate; a log with nothing appended gives a call that does nothing."""
    import os

    log = _logged(tmp_path, "run")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log.add({"stage": "grpo", "split": "train", "epoch": 1, "step": 3, "loss": 0.5})  # an append: opens the file
    assert log._fd is not None
    sync = log.commit_later()
    log.add({"stage": "grpo", "split": "train", "epoch": 1, "step": 4, "brand_new": 1.0})  # a rewrite
    before = len(synced)
    sync()
    assert len(synced) == before + 1  # one fsync, of the duplicate
    dup = synced[-1]
    with pytest.raises(OSError):
        os.fstat(dup)  # closed after the sync
    MetricsLog(None).commit_later()()  # nothing to sync


# ---- the run's log handed from stage to stage (RunContext.metrics_log)
RCE_ROWS = [
    {"stage": "rce", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.25, "temperature": 2.0},
    {"stage": "rce", "split": "train", "epoch": 1, "step": 1, "loss": 0.75, "grad_norm": 1.5},
]


def _stat(path):
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _next_stage(log: MetricsLog) -> bytes:
    """Start RCE on ``log`` and log its rows; the file's bytes then."""
    log.start_stage("rce", [])
    for row in RCE_ROWS:
        log.add(dict(row))
    log.close()
    return (log.path).read_bytes()


def test_a_reopened_log_keeps_its_rows_and_a_fresh_stage_leaves_the_file_alone(tmp_path):
    """The next stage of a run takes the log as the last one left it: no read, and a fresh stage with no row in the
    file does not rewrite it; what it then writes equals what a log read from the file writes."""
    import shutil

    log = _logged(tmp_path, "run")
    log.close()
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    before, rows = _stat(log.path), list(log.rows)
    again = log.reopen()
    assert again is log and len(again.rows) == len(rows) and all(a is b for a, b in zip(again.rows, rows))
    again.start_stage("rce", [])
    assert _stat(log.path) == before  # not rewritten
    assert _next_stage(again) == _next_stage(MetricsLog(tmp_path / "copy"))


def test_a_reopen_reads_the_file_again_when_another_writer_touched_it(tmp_path):
    """A row appended, or the file replaced, by someone else after the log closed: the reopened log holds the file's
    rows, as a log read afresh does."""
    for how in ("append", "replace"):
        log = _logged(tmp_path, how)
        log.close()
        other = MetricsLog(tmp_path / how)
        if how == "append":
            other.add({"stage": "grpo", "split": "train", "epoch": 1, "step": 3, "loss": 0.5})
        else:
            other.start_stage("grpo", [])  # drops the grpo rows: a rewrite (a new file under the name)
        other.close()
        fresh = MetricsLog(tmp_path / how)
        log.reopen()
        assert log.columns == fresh.columns and len(log.rows) == len(fresh.rows)
        assert all(_same(a[k], b[k]) for a, b in zip(log.rows, fresh.rows) for k in a)


def test_a_failed_append_makes_the_next_stage_read_the_file(tmp_path, monkeypatch):
    """A write that failed (a full disk) leaves a row in memory that the file lacks: the reopened log reads the
    file, so the lost row is not carried on."""
    import errno
    import os

    log = _logged(tmp_path, "run")
    log.add({"stage": "grpo", "split": "train", "epoch": 1, "step": 3, "loss": 0.5})  # the descriptor is open
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        log.add({"stage": "grpo", "split": "train", "epoch": 1, "step": 4, "loss": 0.25})
    monkeypatch.setattr(os, "write", real_write)
    log.close()
    assert [r["step"] for r in log.reopen().rows if r["stage"] == "grpo"] == [0, 1, 2, 3]


@pytest.mark.parametrize("stacked", [False, True], ids=["one run", "stacked"])
def test_a_run_hands_its_log_from_stage_to_stage_and_writes_the_same_files(tmp_path, monkeypatch, stacked):
    """A whole run (alone, and two stacked) with the log handed from stage to stage writes the same metrics.csv and
    summary.csv as with every stage reading the file afresh, and reads the file no more (it is new)."""
    from conftest import tiny_config

    from v3kit.pipeline import run_pipeline
    from v3kit.pipeline_stacked import run_stacked

    reads = []
    real_read = MetricsLog._read
    monkeypatch.setattr(MetricsLog, "_read", staticmethod(lambda path: (reads.append(path), real_read(path))[1]))

    def run(root):
        cfgs = [tiny_config(root / f"seed{s}", f"seed={s}", "data.split_seed=0") for s in range(2 if stacked else 1)]
        if stacked:
            out = run_stacked(cfgs)
            assert out.stacked and not any(isinstance(r, BaseException) for r in out.results)
        else:
            run_pipeline(cfgs[0])
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.csv"))}

    handed = run(tmp_path / "handed")
    assert reads == []
    monkeypatch.setattr(MetricsLog, "reopen", lambda self: MetricsLog(self.path.parent))
    afresh = run(tmp_path / "afresh")
    assert len(reads) >= 2  # the stages after SFT read the file
    assert handed.keys() == afresh.keys() and len(handed) >= 2
    assert handed == afresh


def test_a_stage_sent_to_another_dir_leaves_the_runs_own_log_alone(tmp_path, monkeypatch):
    """``Run.context(run_dir=...)`` elsewhere neither reads the run's own metrics.csv nor hands its log over: that
    stage's log is its own dir's. The run's own dir (given as a string too) gets the run's one log."""
    from conftest import tiny_config

    from v3kit import Run

    reads = []
    real_read = MetricsLog._read
    monkeypatch.setattr(MetricsLog, "_read", staticmethod(lambda path: (reads.append(path), real_read(path))[1]))
    run = Run(tiny_config(tmp_path / "run"))
    other = run.context(run_dir=tmp_path / "other")
    assert other.get("metrics_log") is None and other["run_dir"] == tmp_path / "other"
    assert run.context(run_dir=None).get("metrics_log") is None
    assert reads == [] and run._log is None
    own = run.context()["metrics_log"]
    assert isinstance(own, MetricsLog) and own.path == tmp_path / "run" / "metrics.csv"
    assert run.context(run_dir=str(tmp_path / "run"))["metrics_log"] is own
    mine = MetricsLog(tmp_path / "run")
    assert run.context(metrics_log=mine)["metrics_log"] is mine
