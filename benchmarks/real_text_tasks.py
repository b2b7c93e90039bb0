"""Two real-text ranking tasks built offline from the docstrings of installed scientific libraries.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/real_text_tasks.py [--out DIR] [--seed 0]

They measure `v3kit investigate` and a hand search on data the kit was never tuned on (docs/verdict.md, "Measured
on four tasks"). Neither is the stdlib example (the Python standard library's functions) and neither is used by the
tests. Both read numpy, scipy, scikit-learn, pandas, networkx, torch, sympy and matplotlib (their installed versions
decide the text, so the tables are deterministic for one environment and seed, not across library versions).

* ``doc_paraphrase`` (task A): the query is a function's one-line docstring summary; a candidate is another
  function's *extended summary* (the prose paragraphs after the summary line, before the first numpydoc section).
  Query and candidate are both plain prose about the same function, so the raw MiniLM cosine is strong. Group: the
  true function + the 7 functions whose extended summaries BM25 ranks nearest the query (hard negatives).
* ``module_routing`` (task B): the query is a function's one-line summary; a candidate is a *submodule* of one of
  those libraries, as ``name: title`` (e.g. ``scipy.signal: Signal processing``); the label is the submodule that
  defines the function. Candidates recur across queries, and which module a function lives in is only loosely
  a matter of text similarity (a stats summary and ``scipy.stats: Statistical functions`` share few words), so a
  learned model has something to learn that the raw cosine misses. Group: the true module + the 7 other modules
  whose profile (title + the other functions' summaries) BM25 ranks nearest the query.

The reward of both is a cheap BM25 reward model with seeded noise: BM25 of the query words against the candidate's
text (A: its extended summary; B: its module profile without the query's own function, leave-one-out), divided by
the group's highest BM25, plus Gaussian noise (std ``--reward-noise``). It is imperfect on purpose, and has no
per-candidate bias. There is no ``utility`` column.

Tables are written as Parquet (text only: the kit embeds the texts with frozen all-MiniLM-L6-v2 when it loads
them) under ``--out`` (default ``$V3KIT_TASKS``, else ``~/.cache/v3kit/tasks``, outside the repo). Each table gets a ``.json`` beside it with its
counts, the reward's label agreement and the raw MiniLM cosine's acc@1 over all queries.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from v3kit.data.stdlib_search import BM25, words

# Modules read, in order: a function re-exported by a later module is listed under the first one that has it.
# Submodules come before their package, so `numpy.linalg.norm` is routed to numpy.linalg, not numpy.
MODULES = (
    "numpy.linalg",
    "numpy.fft",
    "numpy.random",
    "numpy.ma",
    "numpy.polynomial.polynomial",
    "numpy.strings",
    "numpy",
    "scipy.linalg",
    "scipy.stats",
    "scipy.signal",
    "scipy.optimize",
    "scipy.integrate",
    "scipy.interpolate",
    "scipy.special",
    "scipy.sparse.linalg",
    "scipy.sparse.csgraph",
    "scipy.sparse",
    "scipy.spatial.distance",
    "scipy.spatial",
    "scipy.ndimage",
    "scipy.fft",
    "scipy.cluster.hierarchy",
    "scipy.cluster.vq",
    "scipy.io",
    "sklearn.metrics",
    "sklearn.preprocessing",
    "sklearn.linear_model",
    "sklearn.cluster",
    "sklearn.decomposition",
    "sklearn.model_selection",
    "sklearn.feature_extraction.text",
    "sklearn.utils",
    "sklearn.datasets",
    "sklearn.manifold",
    "sklearn.neighbors",
    "sklearn.covariance",
    "sklearn.feature_selection",
    "pandas",
    "torch.nn.functional",
    "torch.linalg",
    "torch.fft",
    "torch.special",
    "networkx.algorithms.shortest_paths",
    "networkx.algorithms.centrality",
    "networkx.algorithms.community",
    "networkx.algorithms.flow",
    "networkx.algorithms.isomorphism",
    "networkx.generators",
    "networkx.drawing",
    "networkx.readwrite",
    "networkx.algorithms",
    "networkx",
    "sympy",
    "matplotlib.pyplot",
)
# Classes whose public methods join the functions, listed as if each class were a module.
CLASSES = ("pandas.DataFrame", "pandas.Series", "pandas.Index", "networkx.Graph", "networkx.DiGraph")
# Titles of modules whose docstring has none (torch's submodules have no docstring).
FALLBACK_TITLES = {
    "torch.linalg": "Linear algebra on tensors",
    "torch.fft": "Discrete Fourier transforms of tensors",
    "torch.special": "Special functions on tensors",
    "networkx": "Graph data structures",
}
_SECTION = re.compile(r"^\s*(-{3,}|={3,})\s*$")
_ROLE = re.compile(r":\w+:`~?([^`]+)`")  # :mod:`scipy.signal` -> scipy.signal
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")


@dataclass
class Doc:
    module: str
    name: str  # module.attr
    summary: str  # first paragraph, on one line
    extended: str  # the prose paragraphs after the summary, before the first section header
    rest: str  # everything after the summary


def _split_doc(doc: str) -> tuple[str, str, str]:
    doc = inspect.cleandoc(doc)
    summary, _, rest = doc.partition("\n\n")
    lines = rest.split("\n")
    prose: list[str] = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _SECTION.match(nxt) or line.strip().startswith((">>>", "..", "Parameters", "Returns")):
            break
        prose.append(line)
    extended = " ".join(" ".join(prose).split())
    return " ".join(summary.split()), extended, rest.strip()


def module_title(mod: object, name: str) -> str:
    """The first line of the module docstring that has words (numpydoc titles sit between '=' rules)."""
    for line in (getattr(mod, "__doc__", None) or "").split("\n"):
        line = _ROLE.sub(r"\1", line).strip().strip("`")
        if re.search(r"[A-Za-z]{3}", line) and not line.startswith(".."):
            line = re.sub(r"\(\s*[\w.]+\s*\)$", "", line).strip()  # "Signal processing (scipy.signal)"
            if line and line.lower() != name.lower():
                return line[:120]
    return FALLBACK_TITLES.get(name, name)


def _import(name: str) -> object | None:
    """A module, or a class given as ``module.Class``; None when its library is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
        mod_name, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError):
            return None


def collect(modules: tuple[str, ...] = MODULES + CLASSES) -> tuple[list[Doc], dict[str, str]]:
    """Public callables with a docstring, by module or class (first one wins), sorted; and each one's title."""
    seen: set[int] = set()
    docs: list[Doc] = []
    titles: dict[str, str] = {}
    for mod_name in modules:
        mod = _import(mod_name)
        if mod is None:
            continue
        if inspect.isclass(mod):
            titles[mod_name] = _split_doc(mod.__doc__ or mod_name)[0][:120]
        else:
            titles[mod_name] = module_title(mod, mod_name)
        for attr in sorted(a for a in dir(mod) if not a.startswith("_")):
            try:
                obj = getattr(mod, attr)
            except Exception:
                continue
            if not callable(obj) or inspect.ismodule(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str) or not doc.strip():
                continue
            summary, extended, rest = _split_doc(doc)
            docs.append(Doc(mod_name, f"{mod_name}.{attr}", summary, extended, rest))
    return docs, titles


def usable_queries(docs: list[Doc]) -> list[int]:
    """Summaries that make a query: 4-40 words, not a signature, not shared by another function."""
    counts = Counter(d.summary.lower() for d in docs)
    return [
        i
        for i, d in enumerate(docs)
        if 4 <= len(words(d.summary))
        and len(d.summary.split()) <= 40
        and counts[d.summary.lower()] == 1
        and not _SIGNATURE_LINE.match(d.summary)
    ]


def bm25_scores(bm25: BM25, query: list[str]) -> np.ndarray:
    """``bm25.scores(query)``, summed over the query's terms in sorted order: ``BM25.scores`` walks a ``set``, whose
    order follows Python's per-process string hashing, so its float sums may differ in the last bit between runs."""
    out = np.zeros(bm25.n)
    for term in sorted(set(query)):
        if term in bm25.index:
            ids, ws = bm25.index[term]
            out[ids] += ws
    return out


def _normalised(scores: np.ndarray) -> np.ndarray:
    top = scores.max()
    return scores / top if top > 0 else scores


def _group_rows(qid: str, query: str, cands: list[tuple[str, str, bool, float]], noise: np.ndarray) -> list[dict]:
    bm = _normalised(np.array([c[3] for c in cands]))
    return [
        {
            "query_id": qid,
            "candidate_id": cid,
            "query_text": query,
            "candidate_text": text,
            "reward": float(bm[k] + noise[k]),
            "is_label": is_label,
        }
        for k, (cid, text, is_label, _) in enumerate(cands)
    ]


def doc_paraphrase(docs: list[Doc], *, max_queries: int, group: int, noise: float, seed: int) -> pd.DataFrame:
    """Task A: summary -> the same function's extended summary, among BM25 hard negatives."""
    pool = [i for i, d in enumerate(docs) if len(words(d.extended)) >= 8 and d.summary not in d.extended]
    texts = [docs[i].extended for i in pool]
    dup = Counter(texts)
    pool = [i for i, t in zip(pool, texts) if dup[t] == 1]
    texts = [docs[i].extended for i in pool]
    queries = [k for k, i in enumerate(pool) if i in set(usable_queries(docs))]
    rng = np.random.default_rng(seed)
    if len(queries) > max_queries:
        queries = sorted(rng.choice(queries, size=max_queries, replace=False).tolist())
    bm25 = BM25([words(t) for t in texts])
    rows: list[dict] = []
    for k in queries:
        d = docs[pool[k]]
        s = bm25_scores(bm25, words(d.summary))
        s_neg = s.copy()
        s_neg[k] = -np.inf
        grp = [k] + [int(j) for j in np.argsort(-s_neg, kind="stable")[: group - 1]]
        grp = [grp[p] for p in rng.permutation(len(grp))]
        cands = [(docs[pool[j]].name, texts[j], j == k, float(s[j])) for j in grp]
        rows += _group_rows(d.name, d.summary, cands, noise * rng.standard_normal(len(grp)))
    return pd.DataFrame(rows)


def module_routing(
    docs: list[Doc], titles: dict[str, str], *, max_queries: int, group: int, noise: float, seed: int
) -> pd.DataFrame:
    """Task B: summary -> the submodule that defines the function, among the modules BM25 ranks nearest."""
    mods = sorted(titles)
    text = {m: f"{m}: {titles[m]}" for m in mods}
    members: dict[str, list[int]] = {m: [] for m in mods}
    for i, d in enumerate(docs):
        members[d.module].append(i)
    queries = [i for i in usable_queries(docs) if len(members[docs[i].module]) >= 5]
    rng = np.random.default_rng(seed)
    if len(queries) > max_queries:
        queries = sorted(rng.choice(queries, size=max_queries, replace=False).tolist())
    # A module's profile: its title and its functions' summaries. The reward leaves the query's own summary out
    # (else it would find the label verbatim); the retriever that picks the negatives never sees the label.
    profile_words = {m: words(text[m]) + [w for i in members[m] for w in words(docs[i].summary)] for m in mods}
    bm25 = BM25([profile_words[m] for m in mods])
    rows: list[dict] = []
    for i in queries:
        d = docs[i]
        q = words(d.summary)
        s = bm25_scores(bm25, q)
        label = mods.index(d.module)
        own = Counter(words(d.summary))
        loo = Counter(profile_words[d.module])
        loo.subtract(own)
        loo_index = BM25([sorted(loo.elements())] + [profile_words[m] for m in mods if m != d.module])
        s_label = bm25_scores(loo_index, q)[0]
        s_neg = s.copy()
        s_neg[label] = -np.inf
        grp = [label] + [int(j) for j in np.argsort(-s_neg, kind="stable")[: group - 1]]
        grp = [grp[p] for p in rng.permutation(len(grp))]
        cands = [(mods[j], text[mods[j]], j == label, float(s_label if j == label else s[j])) for j in grp]
        rows += _group_rows(d.name, d.summary, cands, noise * rng.standard_normal(len(grp)))
    return pd.DataFrame(rows)


def describe(df: pd.DataFrame) -> dict:
    """Counts, the reward's label agreement and the raw MiniLM cosine's acc@1 (over all queries)."""
    from v3kit.data.text import embed_texts

    top = df.loc[df.groupby("query_id", sort=False)["reward"].idxmax()]
    q_vec = embed_texts(df["query_text"].tolist(), max_tokens=128, progress=False)
    c_vec = embed_texts(df["candidate_text"].tolist(), max_tokens=128, progress=False)
    cos = (np.asarray(q_vec) * np.asarray(c_vec)).sum(1)
    best = df.assign(cos=cos).groupby("query_id", sort=False)["cos"].idxmax()
    return {
        "queries": int(df["query_id"].nunique()),
        "rows": len(df),
        "distinct_candidates": int(df["candidate_id"].nunique()),
        "reward_label_agreement": float(top["is_label"].mean()),
        "raw_cosine_acc@1_all_queries": float(df.loc[best, "is_label"].mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default=str(Path(os.environ.get("V3KIT_TASKS", Path.home() / ".cache" / "v3kit" / "tasks")))
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-queries", type=int, default=2400)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--reward-noise", type=float, default=0.15)
    ap.add_argument("--no-describe", action="store_true", help="skip the MiniLM embedding of the summary")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs, titles = collect()
    kw = dict(max_queries=args.max_queries, group=args.group_size, noise=args.reward_noise, seed=args.seed)
    tables = {
        "doc_paraphrase": doc_paraphrase(docs, **kw),
        "module_routing": module_routing(docs, titles, **kw),
    }
    for name, df in tables.items():
        path = out / f"{name}.parquet"
        df.to_parquet(path, index=False)
        info = {"path": str(path), "seed": args.seed, **({} if args.no_describe else describe(df))}
        (out / f"{name}.json").write_text(json.dumps(info, indent=2))
        print(name, json.dumps(info))


if __name__ == "__main__":
    main()
