"""A run's ``metrics.csv``, one row per training step and per held-out evaluation, a stage's result (its rows of
it), and the callbacks that see every row (the live plots, the trackers). The file is appended to and fsynced before each epoch checkpoint, so a crash
never leaves a row that no checkpoint vouches for; a resume rebuilds it from the rows the checkpoint stores."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from torch import nn

from ..rundir import DISK_FULL_ERRNOS, atomic_write_text, disk_full_error


def split_rows(history: pd.DataFrame, split: str) -> pd.DataFrame:
    """The ``train`` (per step) or ``val`` (per epoch) rows of a metrics history."""
    return history[history["split"] == split].reset_index(drop=True)


@dataclass
class StageResult:
    stage: str
    model: nn.Module
    history: pd.DataFrame  # this stage's rows of metrics.csv
    final_metrics: dict[str, float]  # held-out metrics after the last epoch
    checkpoints: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def train_history(self) -> pd.DataFrame:
        return split_rows(self.history, "train")

    @property
    def eval_history(self) -> pd.DataFrame:
        return split_rows(self.history, "val")


def read_metrics_frame(path: str | Path) -> pd.DataFrame:
    """A run's ``metrics.csv`` as a frame, for whatever reads a finished run; a file that is not CSV text (binary
    garbage, a torn header, nothing at all) is one error naming it, not pandas' decode or parser error."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: the run wrote no metrics yet (did it start?)") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        what = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "is not a well-formed CSV"
        raise ValueError(
            f"{path} {what} ({' '.join(str(e).split())[:120]}): it is not a metrics.csv as `v3kit run` writes it; "
            "restore it (a --resume rewrites it from the checkpoints) or move it away"
        ) from None


class Callback:
    """Hooks a notebook (live plots) or a script can implement; every method is optional."""

    def on_stage_start(self, stage: str, total_steps: int, info: dict[str, Any]) -> None: ...

    def on_step(self, row: dict[str, Any]) -> None: ...

    def on_eval(self, row: dict[str, Any]) -> None: ...

    def on_stage_end(self, stage: str, result: StageResult) -> None: ...


def call_callbacks(callbacks: Sequence[Any], method: str, *args: Any) -> None:
    """Call ``method`` on every callback that has it (every method of :class:`Callback` is optional)."""
    for cb in callbacks:
        fn = getattr(cb, method, None)
        if fn is not None:
            fn(*args)


_JSON_EXACT = frozenset((str, int, float, bool, type(None)))  # what a JSON round trip gives back as it was


def _cell(value: Any) -> str:
    """One CSV cell exactly as ``DataFrame.to_csv`` writes it (floats by ``repr``, NaN/None empty)."""
    if type(value) is float:  # most cells: one type test
        return repr(value) if value == value else ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _parse_cell(text: str) -> Any:
    """Inverse of :func:`_cell` for the values v3kit logs (ints, floats, strings); empty is NaN."""
    if text == "":
        return math.nan
    # Fast paths for what v3kit writes (a resume or a stage start reads every cell back): ASCII digits are an int,
    # and text with a point or an exponent is never one, so float is tried first; anything else as int() then float().
    if text.isascii() and (text.isdigit() or (text[0] == "-" and text[1:].isdigit())):
        return int(text)
    if "." in text or "e" in text or "E" in text:
        try:
            return float(text)
        except ValueError:
            return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _file_key(file: Path | int | None) -> tuple[int, ...] | None:
    """A file's (a path's or a descriptor's) identity and state as ``stat`` gives them (None: no file): any write or
    replacement changes it."""
    if file is None:
        return None
    try:
        st = os.fstat(file) if isinstance(file, int) else os.stat(file)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _csv_line(cells: list[str]) -> str:
    """``cells`` as one line of ``csv.writer(lineterminator="\\n")``: joined with commas when no cell needs quoting
    (numbers and plain names never do: a step's row is formatted 4x faster), else through the csv writer."""
    line = ",".join(cells)
    if '"' in line or "\n" in line or "\r" in line or line.count(",") != len(cells) - 1 or line == "":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        return buf.getvalue()
    return line + "\n"


def _plain(value: Any) -> Any:
    """Python scalars only (numpy/torch scalars -> ``.item()``), so rows can ride in a ``weights_only`` checkpoint."""
    if type(value) in _JSON_EXACT:  # the common case, without hasattr's failed lookup
        return value
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def stage_log(shared: MetricsLog | None, run_dir: str | Path | None) -> MetricsLog:
    """A stage's metrics log: the run's own (``RunContext.metrics_log``, holding the rows of the run's earlier
    stages) when it is ``run_dir``'s, else ``run_dir``'s file read afresh."""
    if shared is not None and run_dir is not None and shared.path == Path(run_dir) / "metrics.csv":
        return shared.reopen()
    return MetricsLog(run_dir)


class MetricsLog:
    """Rows of ``metrics.csv``: one per training step (``split="train"``) and per evaluation (``split="val"``).

    Crash safety: the file is only appended to (a row per line, flushed as it is logged, fsynced before each
    epoch checkpoint) or replaced whole through a temp file and a rename (when a row brings a new column, and when
    a stage starts). Each epoch checkpoint also stores the stage's rows up to it (:meth:`stage_rows`); a resume
    rebuilds the stage's rows from there (:meth:`start_stage`), so rows logged after that checkpoint, a torn last
    line, or rows lost after the checkpoint was written are all put back exactly. Columns are the union of the
    rows' keys in first-seen order, the layout ``DataFrame(rows).to_csv`` gives.
    """

    def __init__(self, run_dir: str | Path | None) -> None:
        self.path = None if run_dir is None else Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self._fd: int | None = None  # the append descriptor (raw writes: a failed one can be cut back exactly)
        self._packed: dict[str, tuple[Any, int, int, list[str]]] = {}  # per stage, its rows' JSON so far
        # The CSV lines of the first rows under the first ``_width`` columns: a rewrite for new columns pads them
        # instead of formatting every row again (the file is rewritten whenever a row brings a column).
        self._lines: list[str] = []
        self._width = 0
        # Whether the file is exactly the header and ``_lines`` (every row's line), and the file's identity (device,
        # inode, size, mtime) after this log last read or wrote it (None: unknown, e.g. after a failed write):
        # :meth:`reopen` keeps the rows in memory while the file is as this log left it.
        self._exact = False
        self._key: tuple[int, ...] | None = None
        self._load()

    def _load(self) -> None:
        self.rows, self.columns, self._lines, self._width, self._exact = [], [], [], 0, False
        if self.path is not None and self.path.exists():
            self.columns, self.rows = self._read(self.path)
        self._key = _file_key(self.path)

    def reopen(self) -> MetricsLog:
        """This log, for the run's next stage (``RunContext.metrics_log``): its rows stay those in memory while
        ``metrics.csv`` is as this log left it, else they are read from the file again (another writer touched it).
        The next stage then neither parses the file nor, when it starts fresh, rewrites it (about 0.1 s a run of the
        default world by GRPO; 0.5 s of a stack of 8 such runs)."""
        if self._fd is None and (self._key is None or _file_key(self.path) != self._key):
            self._load()
        return self

    @staticmethod
    def _read(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
        """Header and complete rows of ``path``; a torn last line (no newline, or the wrong number of fields, e.g.
        after a kill or a full disk mid-append) is dropped: the resume restores it from the checkpoint."""
        text = path.read_text(encoding="utf-8", errors="replace")
        complete = text[: text.rfind("\n") + 1]
        records = list(csv.reader(io.StringIO(complete)))
        if not records or not records[0]:
            return [], []
        header = records[0]
        if not {"stage", "split", "epoch", "step"} <= set(header):
            raise ValueError(
                f"{path} is not a v3kit metrics.csv (header {header[:6]}); move it away or use another run_dir"
            )
        rows = [{k: _parse_cell(v) for k, v in zip(header, rec)} for rec in records[1:] if len(rec) == len(header)]
        return header, rows

    def start_stage(self, stage: str, kept: str | list[dict[str, Any]] | None, after_epoch: int = 0) -> None:
        """This stage's rows become ``kept`` (a checkpoint's rows; ``[]`` for a fresh start), in place of the ones
        in the file; then the file is rewritten atomically. ``kept=None`` (a checkpoint from before rows were
        stored in it) keeps the file's rows up to ``after_epoch``; a string is :meth:`packed_stage_rows`' form."""
        if isinstance(kept, str):
            kept = json.loads(kept)
        self._packed.pop(stage, None)
        if not kept and self._exact and all(r["stage"] != stage for r in self.rows):
            return  # a fresh stage the file holds no row of: the rows, the columns and the file stay as they are
        if kept is None:
            kept = [r for r in self.rows if r["stage"] == stage and r["epoch"] <= after_epoch]
        out: list[dict[str, Any]] = []
        for r in self.rows:
            if r["stage"] != stage:
                out.append(r)
            elif kept:  # where the stage's rows were: the first of them takes the whole (rebuilt) block
                out += kept
                kept = []
        self.rows = out + kept
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        self.columns = columns
        self._lines, self._width = [], 0  # rows and columns in another order: format them all again
        self._rewrite()

    def stage_rows(self, stage: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["stage"] == stage]

    def packed_stage_rows(self, stage: str) -> str | list[dict[str, Any]]:
        """:meth:`stage_rows` as one JSON text, what an epoch checkpoint stores: ``torch.save`` calls back into
        Python for every object it pickles, so 500 rows of 20 cells cost 4 ms as dicts and 0.2 ms as one string.
        JSON keeps ints, floats (NaN and infinities too, by ``repr``), strings and None exactly; rows holding
        anything else stay a list. :meth:`start_stage` reads either form."""
        # (the row list scanned, its length then, the stage's rows encoded, their JSON in chunks): rows are only
        # appended to one list (start_stage and a reload make a new one), so each call scans just the rows added
        # since the last (every epoch scanning every row of the run cost 1% of a stack of 8 default-world runs)
        seen, scanned, done, chunks = self._packed.get(stage, (None, 0, 0, []))
        if seen is self.rows and scanned <= len(self.rows):
            new = [r for r in self.rows[scanned:] if r["stage"] == stage]
            count = done + len(new)
        else:
            rows = self.stage_rows(stage)
            new, count = rows[done:], len(rows)
        if not {type(v) for r in new for v in r.values()} <= _JSON_EXACT:
            return self.stage_rows(stage)
        if new:  # the epoch's rows in one call: json.dumps of a list joins its items with ", ", as below
            chunks.append(json.dumps(new)[1:-1])
        self._packed[stage] = (self.rows, len(self.rows), count, chunks)
        return "[" + ", ".join(chunks) + "]"  # json.dumps(rows), each row encoded once

    def add(self, row: dict[str, Any]) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        elif self.path is not None:
            line = self._line(row)
            self._cache([line])
            self._append(line.encode("utf-8"))

    def add_many(self, rows: list[dict[str, Any]]) -> None:
        """:meth:`add` of each row in turn, with one write (or one rewrite when the rows bring new columns): the
        same file as adding them one by one."""
        rows = [{k: _plain(v) for k, v in row.items()} for row in rows]
        new: list[str] = []
        known = set(self.columns)
        for row in rows:
            if not known.issuperset(row):
                new += [k for k in row if k not in known and k not in new]
                known.update(row)
        self.rows += rows
        if new:
            self.columns += new
            self._rewrite()
        elif self.path is not None and rows:
            lines = [self._line(r) for r in rows]
            self._cache(lines)
            self._append("".join(lines).encode("utf-8"))

    def _cache(self, lines: list[str]) -> None:
        """Keep the lines just appended (the rows at the end of ``self.rows``) when the cache holds every row
        before them."""
        if len(self._lines) + len(lines) == len(self.rows):
            self._lines += lines
        else:
            self._exact = False

    def _append(self, data: bytes) -> None:
        """Append one row; on a full disk (or any write error) cut the file back to where it was, so no torn line
        is left, and raise naming the file (os.write's own error names none)."""
        fd = self._open()
        start = os.lseek(fd, 0, os.SEEK_END)
        mine = self._key is not None and self._key[2] == start  # the file still ends where this log left it
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._key = _file_key(fd) if mine else None
        except OSError as e:
            self._exact, self._key = False, None  # the rows in memory are no longer the file's: a reopen reads it
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            err = disk_full_error(e, self.path, len(data))
            raise err if err is not e else OSError(e.errno, e.strerror, str(self.path)) from None

    def commit(self) -> None:
        """Make every logged row durable (called before an epoch's checkpoint is written)."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise (
                    disk_full_error(e, self.path)
                    if e.errno in DISK_FULL_ERRNOS
                    else OSError(e.errno, e.strerror, str(self.path))
                ) from None

    def commit_later(self) -> Callable[[], None]:
        """:meth:`commit` as a call to make on another thread (the stacked trainer's checkpoint writer, before the
        checkpoint that vouches for the rows): it fsyncs a duplicate of the append descriptor taken now, so a
        rewrite or a close in between cannot pull the file from under it (a rewrite is itself fsynced)."""
        if self._fd is None:
            return lambda: None
        fd, path = os.dup(self._fd), self.path

        def sync() -> None:
            try:
                os.fsync(fd)
            except OSError as e:
                raise (
                    disk_full_error(e, path) if e.errno in DISK_FULL_ERRNOS else OSError(e.errno, e.strerror, str(path))
                ) from None
            finally:
                os.close(fd)

        return sync

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.commit()
            finally:
                os.close(self._fd)
                self._fd = None

    def _line(self, row: dict[str, Any]) -> str:
        return _csv_line([_cell(row.get(c)) for c in self.columns])

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        return self._fd

    def _rewrite(self) -> None:
        if self.path is None:
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        header = self._line({c: c for c in self.columns}) if self.columns else ""
        # New columns go at the end, where every earlier row has an empty cell: its line gains a comma each
        # (a row has at least 4 cells, so no line is a lone empty field, which csv would quote).
        pad = "," * (len(self.columns) - self._width)
        lines = [line[:-1] + pad + "\n" for line in self._lines] if pad else self._lines
        lines += [self._line(r) for r in self.rows[len(lines) :]]
        self._lines, self._width = lines, len(self.columns)
        self._exact, self._key = False, None
        atomic_write_text(self.path, header + "".join(lines))
        self._exact, self._key = True, _file_key(self.path)

    def frame(self, stage: str | None = None) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        return df if stage is None or df.empty else df[df["stage"] == stage].reset_index(drop=True)
