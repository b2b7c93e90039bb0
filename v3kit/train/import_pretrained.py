"""The Hugging Face imports: a ``save_pretrained`` directory (``--from-pretrained``) and a sentence-transformers
model (``--sentence-transformers``) as the policy of a v3kit SFT checkpoint, checked and written as every import is
(:mod:`v3kit.train.import_checks`). Public through :mod:`v3kit.train.import_sft`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

from ..data.text import PACKAGED_ENCODERS
from .import_checks import build_imported, check_dims, fit_report, model_changes, write_import
from .model import ModelConfig, import_object
from .pretrained import ST_MODULES_FILE, from_pretrained, is_pretrained_dir


def import_pretrained(
    directory: str | Path,
    out: str | Path,
    *,
    query_dim: int,
    cand_dim: int,
    target: str | None = None,
    sim_temperature: float | None = None,
    temperature_attr: str | None = None,
    temperature_form: str = "temperature",
    interface: str | None = None,
    methods: Mapping[str, str] | None = None,
    model_config: ModelConfig | None = None,
) -> Path:
    """Write a v3kit SFT checkpoint at ``out`` from a Hugging Face ``save_pretrained`` directory.

    Without ``target`` the class comes from the directory's config.json (``auto_map``, ``architectures``) and the
    checkpoint records the directory as ``model.target`` (rebuilt with ``from_pretrained``). With ``target``
    (``pkg.module:Class``) the model is ``Class.from_pretrained(directory)`` and the checkpoint records the class and
    its config (``model.kwargs.config``), so it rebuilds without the directory. Returns ``out``.
    """
    directory = Path(directory).expanduser()
    if (directory / ST_MODULES_FILE).is_file() and target is None:
        raise ValueError(
            f"--from-pretrained {directory}: it is a sentence-transformers model (it has {ST_MODULES_FILE}); "
            f"import it with --sentence-transformers {directory}"
        )
    if not is_pretrained_dir(directory):
        what = "a file" if directory.is_file() else "not a directory" if not directory.exists() else "a directory"
        raise ValueError(
            f"--from-pretrained {directory} is {what} without a config.json; pass the directory "
            "model.save_pretrained(DIR) wrote (a weights file goes to --state-dict, with --target)"
        )
    base = model_config or ModelConfig()
    changes = model_changes(sim_temperature, interface, methods, temperature_attr)
    check_dims(query_dim, cand_dim)
    if target is None:
        cfg = dataclasses.replace(base, target=str(directory.resolve()), kwargs={}, **changes)
        model = build_imported(cfg, query_dim, cand_dim)
        shown = str(directory)
    else:
        loaded = from_pretrained(import_object(target), directory, target)
        config = json.loads(loaded.config.to_json_string(use_diff=False))
        cfg = dataclasses.replace(base, target=target, kwargs={"config": config}, **changes)
        model = build_imported(cfg, query_dim, cand_dim)  # exactly as a checkpoint rebuilds it
        state = loaded.state_dict()
        fit_report(model, state, directory, target)
        model.load_state_dict(state)
        shown = target
    provenance = {"from_pretrained": str(directory.resolve())}
    return write_import(model, cfg, out, query_dim, cand_dim, shown, provenance, temperature_attr, temperature_form)


ST_TARGET = "v3kit.text_model:SentenceTransformerRanker"
COSINE_TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scales cosines by 20


def import_sentence_transformers(
    directory: str | Path,
    out: str | Path,
    *,
    towers: str = "shared",
    train_layers: int = 1,
    max_tokens: int | None = None,
    sim_temperature: float | None = None,
    model_config: ModelConfig | None = None,
) -> Path:
    """Write a v3kit SFT checkpoint at ``out`` whose policy is the sentence-transformers model ``directory`` (a
    ``.save()`` directory, or the packaged ``all-MiniLM-L6-v2``), as
    :class:`~v3kit.train.text_model.SentenceTransformerRanker` (``towers``, ``train_layers``: -1 = end to end).

    The checkpoint records the directory (its frozen layers are read from it) and the trainable tensors. The policy
    temperature is ``sim_temperature``, else the config's ``model.sim_temperature`` when set, else 0.05 for a
    cosine model (the scale 20 of sentence-transformers' ranking loss) and 1 for a dot-product one.
    """
    name = str(directory)
    if name not in PACKAGED_ENCODERS:
        path = Path(directory).expanduser()
        if not (path / ST_MODULES_FILE).is_file():
            hint = (
                f"it is a transformers save_pretrained directory: use --from-pretrained {path}"
                if is_pretrained_dir(path)
                else "pass the directory SentenceTransformer.save(DIR) wrote"
            )
            raise ValueError(f"--sentence-transformers {path} has no {ST_MODULES_FILE}; {hint}")
        name = str(path.resolve())
    base = model_config or ModelConfig()
    kwargs = {"path": name, "towers": towers, "train_layers": train_layers, "max_tokens": max_tokens}
    if base.normalize:
        kwargs["normalize"] = True
    cfg = dataclasses.replace(base, target=ST_TARGET, kwargs=kwargs, interface="towers", methods={})
    model = build_imported(cfg, 0, 0)
    if sim_temperature is None:
        cosine = bool(getattr(model, "normalize", False)) or cfg.residual
        default = ModelConfig().sim_temperature
        sim_temperature = (
            base.sim_temperature if base.sim_temperature != default else COSINE_TEMPERATURE if cosine else default
        )
    cfg = dataclasses.replace(cfg, sim_temperature=float(sim_temperature))
    provenance = {"sentence_transformers": name}
    return write_import(model, cfg, out, 0, 0, ST_TARGET, provenance)
