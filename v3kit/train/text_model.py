"""End-to-end text towers: a transformer encoder per tower that fine-tunes only its top layers.

Use with text data in ``data.text_mode: end_to_end``::

    model:
      target: v3kit.text_model:TextTwoTower
      sim_temperature: 0.05          # embeddings are L2-normalised (cosine)
      kwargs: {train_layers: 1, max_tokens: 64}

Each batch's texts (``batch.query_text``, ``batch.cand_text``) are tokenised in :meth:`TextTwoTower.featurize`
and encoded by the towers (mean pooling + L2 norm, as all-MiniLM-L6-v2 was trained). The embeddings and the lower
``num_layers - train_layers`` layers stay frozen: no gradient flows into them, and checkpoints hold only the
trainable tensors (the frozen ones are the installed encoder's), so a checkpoint is a few MB, not ~90 MB.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from torch import Tensor, nn

from ..data.contract import Batch
from ..data.text import DEFAULT_ENCODER, INSTALL_HINT, encoder_path, load_sentence_encoder
from .model import ResidualTower


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    # Kept out of the module so deepcopy (the frozen SFT reference) does not copy it.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class TrainableState(nn.Module):
    """Checkpoints hold only the tensors that train; the frozen ones come from the installed encoder. Subclasses set
    ``_saved_keys`` at construction (a frozen deepcopy, the SFT reference, must still save the same tensors)."""

    _saved_keys: frozenset[str] = frozenset()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k[len(prefix) :] in self._saved_keys)

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        missing = sorted(self._saved_keys - set(state_dict))
        unexpected = sorted(set(state_dict) - self._saved_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"{type(self).__name__} state mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def _require_text(batch: Batch, who: str) -> None:
    if batch.query_text is None or batch.cand_text is None:
        raise ValueError(
            f"{who} reads text: the data needs query_text and candidate_text columns (and data.text_mode: end_to_end)"
        )


class TextTwoTower(TrainableState):
    """Query and candidate towers, each a copy of ``encoder`` with its top ``train_layers`` layers trainable."""

    def __init__(
        self,
        query_dim: int = 0,
        cand_dim: int = 0,
        encoder: str = DEFAULT_ENCODER,
        train_layers: int = 1,
        max_tokens: int = 64,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError:
            raise ImportError(f"TextTwoTower needs transformers; {INSTALL_HINT}") from None
        del query_dim, cand_dim  # the towers read text; feature dims (0 in end_to_end mode) are unused
        self.path = encoder_path(encoder)
        base = AutoModel.from_pretrained(self.path)
        n_layers = len(base.encoder.layer)
        if not 0 <= train_layers <= n_layers:
            raise ValueError(f"model.kwargs.train_layers must be in 0..{n_layers} for {encoder!r}, got {train_layers}")
        self.query_encoder = base
        self.cand_encoder = copy.deepcopy(base)
        for enc in (self.query_encoder, self.cand_encoder):
            enc.requires_grad_(False)
            for layer in enc.encoder.layer[n_layers - train_layers :]:
                layer.requires_grad_(True)
        self.max_tokens = max_tokens
        self.normalize = normalize
        # Fixed at construction: a frozen deepcopy (the SFT reference) must still save the same tensors.
        self._saved_keys = frozenset(n for n, p in self.named_parameters() if p.requires_grad)

    # -------------------------------------------------------------------------------------------- inputs
    def _tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        tok = _tokenizer(self.path)(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def featurize(self, batch: Batch) -> tuple[dict[str, Tensor], tuple[dict[str, Tensor], int, int]]:
        _require_text(batch, "TextTwoTower")
        b, g = len(batch.cand_text), len(batch.cand_text[0])
        flat = [t for group in batch.cand_text for t in group]
        return self._tokenize(list(batch.query_text)), (self._tokenize(flat), b, g)

    # -------------------------------------------------------------------------------------------- towers
    def _encode(self, enc: nn.Module, tok: dict[str, Tensor]) -> Tensor:
        out = _mean_pool(enc(**tok).last_hidden_state, tok["attention_mask"])
        return nn.functional.normalize(out, dim=-1) if self.normalize else out

    def encode_query(self, query_input: dict[str, Tensor]) -> Tensor:
        return self._encode(self.query_encoder, query_input)

    def encode_candidates(self, cand_input: tuple[dict[str, Tensor], int, int]) -> Tensor:
        tok, b, g = cand_input
        return self._encode(self.cand_encoder, tok).view(b, g, -1)


# Where common transformer families keep their stack of layers (BERT/RoBERTa/MiniLM, DistilBERT, T5/BART-style,
# decoder-only); anything else: the longest nn.ModuleList inside the model.
LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "model.layers", "h", "encoder.block")


def transformer_layers(module: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of ``module`` (a Hugging Face model), bottom first."""
    for path in LAYER_PATHS:
        node: Any = module
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(module).__name__} has no stack of layers (nn.ModuleList) to train the top of")
    return max(lists, key=len)


def _st_parts(st: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The first module of a SentenceTransformer that holds a Hugging Face model (``auto_model``) and the modules
    after it (pooling, dense, normalize)."""
    mods = list(st)
    for i, m in enumerate(mods):
        if isinstance(getattr(m, "auto_model", None), nn.Module):
            return m.auto_model, mods[i + 1 :]
    raise ValueError(
        f"this sentence-transformers model ({[type(m).__name__ for m in mods]}) has no transformer module; "
        "v3kit trains models whose first module is a Transformer"
    )


class SentenceTransformerRanker(TrainableState):
    """A sentence-transformers model (a ``SentenceTransformer(...).save(DIR)`` directory) as a two-tower ranker.

    ``towers``: ``shared`` (one encoder for queries and candidates, as the model was trained) or ``two`` (a copy
    per side, which may drift apart). ``train_layers``: the top N transformer layers train (and the modules after
    the transformer: dense layers), the rest stays frozen; ``-1`` trains everything end to end. ``normalize``:
    L2-normalise the embeddings (cosine scores); ``None`` follows the model's own similarity function.
    ``residual``: each side gets a :class:`~v3kit.train.model.ResidualTower` (``hidden``) on top of the embedding,
    starting as the identity (the imported model's cosine ranker). Checkpoints hold only the trainable tensors; the
    frozen ones are re-read from ``path``.
    """

    def __init__(
        self,
        query_dim: int = 0,
        cand_dim: int = 0,
        path: str = DEFAULT_ENCODER,
        towers: str = "shared",
        train_layers: int = 1,
        max_tokens: int | None = None,
        normalize: bool | None = None,
        residual: bool = False,
        hidden: list[int] = (64,),
    ) -> None:
        super().__init__()
        del query_dim, cand_dim  # the towers read text
        if towers not in ("shared", "two"):
            raise ValueError(f"model.kwargs.towers must be 'shared' or 'two', got {towers!r}")
        self.path = path
        st = load_sentence_encoder(path, max_tokens=max_tokens, field="model.kwargs.path")
        base, after = _st_parts(st)
        layers = transformer_layers(base)
        if not -1 <= train_layers <= len(layers):
            raise ValueError(
                f"model.kwargs.train_layers (--train-layers) must be -1 (all, end to end) or in 0..{len(layers)} "
                f"for {path!r}, got {train_layers}"
            )
        if train_layers >= 0:
            st.requires_grad_(False)
            for layer in list(layers)[len(layers) - train_layers :]:
                layer.requires_grad_(True)
            if train_layers > 0:
                for m in after:
                    m.requires_grad_(True)
        self.query_encoder = st
        self.cand_encoder = copy.deepcopy(st) if towers == "two" else st
        if normalize is None:
            normalize = getattr(st, "similarity_fn_name", None) in (None, "cosine")
        self.normalize = bool(normalize)
        dim_fn = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        if residual:
            self.query_head: nn.Module = ResidualTower(dim_fn(), list(hidden))
            self.cand_head: nn.Module = ResidualTower(dim_fn(), list(hidden))
        else:
            self.query_head = self.cand_head = nn.Identity()
        self._saved_keys = frozenset(n for n, p in self.named_parameters() if p.requires_grad)

    def _tokenize(self, texts: list[str]) -> dict[str, Any]:
        st = self.query_encoder
        prep = getattr(st, "preprocess", None) or st.tokenize  # sentence-transformers >= 6 / earlier
        return prep(texts)

    def featurize(self, batch: Batch) -> tuple[dict[str, Any], tuple[dict[str, Any], int, int]]:
        _require_text(batch, "SentenceTransformerRanker")
        b, g = len(batch.cand_text), len(batch.cand_text[0])
        flat = [t for group in batch.cand_text for t in group]
        return self._tokenize(list(batch.query_text)), (self._tokenize(flat), b, g)

    def _encode(self, enc: nn.Module, head: nn.Module, features: dict[str, Any]) -> Tensor:
        device = next(enc.parameters()).device
        features = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in features.items()}
        out = enc(features)["sentence_embedding"]
        out = nn.functional.normalize(out, dim=-1) if self.normalize else out
        return head(out)

    def encode_query(self, query_input: dict[str, Any]) -> Tensor:
        return self._encode(self.query_encoder, self.query_head, query_input)

    def encode_candidates(self, cand_input: tuple[dict[str, Any], int, int]) -> Tensor:
        features, b, g = cand_input
        return self._encode(self.cand_encoder, self.cand_head, features).view(b, g, -1)
