"""A real-text example that builds offline: code search over the installed Python's standard library.

* query: a function's docstring summary line (the first paragraph), skipping short, shared or signature-like
  summaries and those the rest of the docstring repeats;
* candidate text: ``module.Qualified.name(signature)`` plus the REST of its docstring (without the summary,
  which would make the match trivial);
* group: the true function plus the ``group_size - 1`` other functions a BM25 retriever over candidate texts
  ranks highest for the query (hard negatives, like a beam), in a seeded random order;
* label: the true function;
* reward: a cheap, imperfect reward model: the share of query words found in the candidate's FULL docstring, plus
  ``length_bias`` times log(words in the docstring) (it likes long docstrings), plus seeded Gaussian noise. Its
  argmax agrees with the label on about 63% of queries with the defaults (see :func:`reward_label_agreement`).

There is no ``utility`` column (real data has none). Only a fixed list of modules is read, each imported (no module
in it has import side effects), and every listing is sorted, so the table is identical across runs on one Python
version. ``builtin_table`` caches it as Parquet keyed by the config, the builder version and the Python version.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..rundir import atomic_write_frame
from .cache import note

BUILDER_VERSION = 2  # bump when the table a config produces changes

# Library modules without import side effects (no GUI, no network at import, no `this`). C modules come first:
# a function re-exported by a later module (statistics imports math.sqrt) is listed under the first one.
MODULES = (
    "builtins",
    "math",
    "cmath",
    "os",
    "time",
    "itertools",
    "operator",
    "binascii",
    "zlib",
    "array",
    "struct",
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email.message",
    "email.utils",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json.decoder",
    "json.encoder",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "netrc",
    "ntpath",
    "numbers",
    "optparse",
    "pathlib",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "posixpath",
    "pprint",
    "queue",
    "quopri",
    "random",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zipimport",
)

_WORD = re.compile(r"[a-z]+|[0-9]+")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # reprs of default values carry memory addresses: not reproducible
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")  # C docstrings often start with their signature
_STOP = frozenset("a an and are as at be by for from if in is it its of on or that the this to with".split())


@dataclass
class StdlibSearchConfig:
    max_queries: int = 2000
    """Queries kept (a seeded sample when the library has more usable summaries)."""
    group_size: int = 8
    """Candidates per query: the true function + group_size - 1 BM25 hard negatives."""
    min_words: int = 4
    """Summaries with fewer words are too vague to be queries."""
    length_bias: float = 0.25
    """Reward += length_bias * log(1 + words in the docstring): the reward's bias."""
    reward_noise: float = 0.1
    """Std of the seeded Gaussian noise on the reward."""
    seed: int = 0
    """Query sample, candidate order and reward noise (independent of the run's seed)."""

    def __post_init__(self) -> None:
        if self.max_queries < 10 or self.group_size < 2 or self.min_words < 1:
            raise ValueError(
                "data.stdlib_search needs max_queries >= 10, group_size >= 2 and min_words >= 1, got "
                f"{self.max_queries}, {self.group_size}, {self.min_words}"
            )
        if self.length_bias < 0 or self.reward_noise < 0:
            raise ValueError("data.stdlib_search.length_bias and reward_noise must be >= 0")


@dataclass
class Function:
    name: str  # module.Qualified.name
    signature: str
    summary: str  # first paragraph of the docstring, on one line
    rest: str  # the docstring after the summary
    doc: str  # the full docstring


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def _signature(fn: object) -> str:
    try:
        return _ADDRESS.sub("", str(inspect.signature(fn)))
    except (TypeError, ValueError):
        return "(...)"


def _function(name: str, fn: object) -> Function | None:
    doc = getattr(fn, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    doc = _ADDRESS.sub("", inspect.cleandoc(doc))
    summary, _, rest = doc.partition("\n\n")
    return Function(name=name, signature=_signature(fn), summary=" ".join(summary.split()), rest=rest.strip(), doc=doc)


def collect_functions(modules: tuple[str, ...] = MODULES) -> list[Function]:
    """Public functions and methods defined in ``modules`` that have a docstring, sorted by name."""
    found: dict[str, Function] = {}
    seen: set[int] = set()
    for mod_name in modules:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:  # a build without this module (e.g. no _ssl): it just contributes nothing
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_"):
                continue
            if inspect.isbuiltin(obj) or (inspect.isfunction(obj) and obj.__module__ == module.__name__):
                items = [(f"{mod_name}.{attr}", obj)]
            elif inspect.isclass(obj) and obj.__module__ == module.__name__:
                items = [
                    (f"{mod_name}.{attr}.{m}", f)
                    for m, f in sorted(vars(obj).items())
                    if (inspect.isfunction(f) or inspect.ismethoddescriptor(f)) and not m.startswith("_")
                ]
            else:
                continue
            for name, fn in items:
                if id(fn) in seen:  # re-exported: listed under the module that came first
                    continue
                seen.add(id(fn))
                f = _function(name, fn)
                if f is not None:
                    found.setdefault(name, f)
    return [found[k] for k in sorted(found)]


def candidate_text(f: Function) -> str:
    return f"{f.name}{f.signature}" + (f"\n{f.rest}" if f.rest else "")


class BM25:
    """Okapi BM25 over tokenised documents, with an inverted index in numpy (no sparse-matrix dependency)."""

    def __init__(self, docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> None:
        self.n = len(docs)
        lengths = np.array([len(d) for d in docs], dtype=np.float64)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0))
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for i, d in enumerate(docs):
            for term, tf in Counter(d).items():
                ids, ws = postings.setdefault(term, ([], []))
                ids.append(i)
                ws.append(tf * (k1 + 1) / (tf + norm[i]))
        self.index = {}
        for term, (ids, ws) in postings.items():
            idf = np.log(1 + (self.n - len(ids) + 0.5) / (len(ids) + 0.5))
            self.index[term] = (np.array(ids), idf * np.array(ws))

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(self.n)
        for term in set(query):
            if term in self.index:
                ids, ws = self.index[term]
                out[ids] += ws
        return out


def reward_model(query: str, f: Function, cfg: StdlibSearchConfig, rng: np.random.Generator) -> float:
    """Share of the query's words in the candidate's full docstring + a length bias + noise (imperfect on purpose)."""
    q = set(words(query))
    doc = words(f.doc)
    overlap = len(q & set(doc)) / max(len(q), 1)
    return float(overlap + cfg.length_bias * np.log1p(len(doc)) + cfg.reward_noise * rng.standard_normal())


def build_table(cfg: StdlibSearchConfig | None = None, functions: list[Function] | None = None) -> pd.DataFrame:
    """The long-form table (query_id, candidate_id, query_text, candidate_text, reward, is_label)."""
    cfg = cfg or StdlibSearchConfig()
    functions = collect_functions() if functions is None else functions
    texts = [candidate_text(f) for f in functions]
    counts = Counter(f.summary.lower() for f in functions)
    queries = [
        i
        for i, f in enumerate(functions)
        if len(words(f.summary)) >= cfg.min_words
        and counts[f.summary.lower()] == 1
        and len(f.summary.split()) <= 40
        and not _SIGNATURE_LINE.match(f.summary)
        and f.summary not in texts[i]
    ]
    rng = np.random.default_rng(cfg.seed)
    if len(queries) > cfg.max_queries:
        queries = sorted(rng.choice(queries, size=cfg.max_queries, replace=False).tolist())
    if len(functions) < cfg.group_size:
        raise ValueError(f"only {len(functions)} documented functions found; lower data.stdlib_search.group_size")
    bm25 = BM25([words(t) for t in texts])
    rows = []
    for qi in queries:
        query = functions[qi].summary
        s = bm25.scores(words(query))
        s[qi] = -np.inf  # the true function joins the group anyway; the rest are its nearest confusers
        same_text = [j for j in np.argsort(-s, kind="stable") if texts[j] != texts[qi]]
        group = [qi] + same_text[: cfg.group_size - 1]
        group = [group[k] for k in rng.permutation(len(group))]
        for j in group:
            rows.append(
                {
                    "query_id": functions[qi].name,
                    "candidate_id": functions[j].name,
                    "query_text": query,
                    "candidate_text": texts[j],
                    "reward": reward_model(query, functions[j], cfg, rng),
                    "is_label": j == qi,
                }
            )
    return pd.DataFrame(rows)


def reward_label_agreement(df: pd.DataFrame) -> float:
    """Share of queries whose highest-reward candidate is the labelled one."""
    top = df.loc[df.groupby("query_id", sort=False)["reward"].idxmax()]
    return float(top["is_label"].mean())


def builtin_table(cfg: StdlibSearchConfig, cache_dir: str | Path) -> pd.DataFrame:
    """:func:`build_table`, cached as ``<cache_dir>/stdlib_search-<key>.parquet`` (written atomically); the key
    covers the config, the builder version and the Python version (whose docstrings it reads)."""
    key_src = json.dumps({"cfg": asdict(cfg), "builder": BUILDER_VERSION, "python": sys.version}, sort_keys=True)
    path = Path(cache_dir) / f"stdlib_search-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.parquet"
    if path.is_file():
        try:
            return pd.read_parquet(path)
        except Exception:  # damaged cache file: rebuild it
            pass
    df = build_table(cfg)
    try:
        atomic_write_frame(path, df)
    except OSError as e:  # a full disk or a read-only cache: use the table built now, like every data cache
        note(f"cannot write the table cache {path} ({e}); using the table without caching it")
    return df
