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
from ..data.text import DEFAULT_ENCODER, INSTALL_HINT, encoder_path


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    # Kept out of the module so deepcopy (the frozen SFT reference) does not copy it.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class TextTwoTower(nn.Module):
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
        if batch.query_text is None or batch.cand_text is None:
            raise ValueError(
                "TextTwoTower reads text: the data needs query_text and candidate_text columns "
                "(and data.text_mode: end_to_end)"
            )
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

    # -------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        """Only the trainable tensors; the frozen ones come from the installed encoder."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k[len(prefix) :] in self._saved_keys)

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        missing = sorted(self._saved_keys - set(state_dict))
        unexpected = sorted(set(state_dict) - self._saved_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"TextTwoTower state mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)
