"""The data floor: the data contract and everything that reads, packs, caches, embeds or makes data.

* ``contract``: :class:`GroupData`, :class:`Splits`, batching and validation (imports nothing of the package);
* ``long_frame``: the long-form table's checks and the conversion to and from :class:`GroupData`;
* ``tables`` / ``ingest`` / ``cache``: reading Parquet, Arrow or JSONL tables, fast packing, the memory-mapped cache;
* ``text``: embedding text columns; ``synthetic`` and ``stdlib_search``: the built-in worlds;
* ``reward_stats`` / ``shortcut`` / ``debias``: what the reward says and how to de-bias it.

It may import only the infrastructure modules at the package's top (``rundir``, ``bounds``, ...), never the model,
the stages or the layers above (``tests/test_layout.py`` checks it). The contract's names are re-exported here, so
``from v3kit.data import GroupData`` keeps working.
"""

from .contract import (
    CHECK_LEVELS,
    FEATURE_COLUMNS,
    FEATURE_DTYPES,
    MAX_FEATURE_ABS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SIDE_COLUMNS,
    TEXT_MODES,
    Batch,
    DataValidationError,
    Embedder,
    GroupData,
    Splits,
    check_feature_dtype,
    iterate_batches,
    num_batches,
    split_by_query,
    split_indices,
    to_feature_dtype,
    validate_tensors,
)
from .long_frame import check_group, check_long_frame, from_long_frame, to_long_frame

__all__ = [
    "CHECK_LEVELS",
    "FEATURE_COLUMNS",
    "FEATURE_DTYPES",
    "MAX_FEATURE_ABS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SIDE_COLUMNS",
    "TEXT_MODES",
    "Batch",
    "DataValidationError",
    "Embedder",
    "GroupData",
    "Splits",
    "check_feature_dtype",
    "check_group",
    "check_long_frame",
    "from_long_frame",
    "iterate_batches",
    "num_batches",
    "split_by_query",
    "split_indices",
    "to_feature_dtype",
    "to_long_frame",
    "validate_tensors",
]
