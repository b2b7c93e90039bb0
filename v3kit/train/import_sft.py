"""``v3kit import-sft``: turn your own trained ranker into a v3kit SFT checkpoint, and the public face of the imports.

Your v2 training code saved ``torch.save(model.state_dict(), "v2.pt")`` (maybe wrapped as ``{"model": sd}`` or
``{"state_dict": sd, "epoch": ...}``, maybe with DDP's ``module.`` prefix), or a Hugging Face ``save_pretrained``
directory, or a sentence-transformers model. v3kit checkpoints also record how to rebuild the model
(``model_config``) and the feature dims, which a bare state dict lacks. The import builds your class through
:func:`v3kit.train.model.build_model`, loads the weights into it with every mismatch reported at once, and writes
``sft.pt`` in the same shape :func:`v3kit.train.sft.train_sft` does, so ``v3kit run --sft`` and notebook 01's
``sft_checkpoint`` accept it.

This module holds the command line (:func:`register_cli`) and re-exports the imports: the plain state dict
(:func:`import_sft`, :mod:`v3kit.train.import_state_dict`), the Hugging Face and sentence-transformers directories
(:func:`import_pretrained`, :func:`import_sentence_transformers`, :mod:`v3kit.train.import_pretrained`), and the
checks and the write they share (:mod:`v3kit.train.import_checks`).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..bounds import MAX_CONFIG_FLOAT, MIN_TEMPERATURE, cli_number
from ..data.contract import GroupData
from .checkpoint import load_checkpoint, model_from_checkpoint
from .import_checks import (  # noqa: F401 - re-exported: v3kit.train.import_sft's public names, as before the split
    NEAR_UNIFORM,
    TEMPERATURE_FORMS,
    StateDictMismatch,
    entropy_share,
    fit_report,
    probe_batch,
    read_temperature,
    temperature_in_scores,
    temperature_twice_message,
)
from .import_pretrained import (  # noqa: F401 - re-exported, as above
    COSINE_TEMPERATURE,
    ST_TARGET,
    import_pretrained,
    import_sentence_transformers,
)
from .import_state_dict import (  # noqa: F401 - re-exported, as above
    WEIGHT_SUFFIXES,
    WRAPPER_KEYS,
    WRAPPER_PREFIXES,
    apply_renames,
    directory_hint,
    import_sft,
    read_state_dict,
    unwrap_state_dict,
)
from .model import INTERFACES, MAX_WIDTH, ModelConfig, import_object, interface_of

__all__ = [
    "StateDictMismatch",
    "import_sft",
    "import_pretrained",
    "import_sentence_transformers",
    "read_state_dict",
    "unwrap_state_dict",
    "apply_renames",
    "fit_report",
    "register_cli",
]


# ---------------------------------------------------------------------------------------------------------- CLI


def _parse_rename(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise ValueError(f"--rename {text!r} must look like OLD=NEW, e.g. --rename query_net=query_encoder")
    return old, new


def _json_object(flag: str, text: str | None, example: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON ({e}); e.g. {flag} '{example}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, e.g. {flag} '{example}', got {text!r}")
    return value


def next_run_command(out: str | Path, args: argparse.Namespace) -> str:
    """The ``v3kit run`` command that trains from the written checkpoint on the same data, quoted for a shell."""
    cmd = ["v3kit", "run", "--sft", str(out)]
    if args.config is not None:
        cmd += ["--config", str(args.config)]
    for item in args.set or []:
        cmd += ["--set", item]
    return shlex.join(cmd)


def _feature_dims(args: argparse.Namespace) -> tuple[int | None, int | None, GroupData | None, ModelConfig | None]:
    query_dim, cand_dim, model_cfg, data = args.query_dim, args.cand_dim, None, None
    if args.config is not None or args.set:
        data, model_cfg = args.data_from_config(args)  # the run floor's: see register_cli
        q, c = data.query_dim, data.cand_dim
        for flag, given, found in (("--query-dim", query_dim, q), ("--cand-dim", cand_dim, c)):
            if given is not None and given != found:
                raise ValueError(f"{flag} {given} disagrees with the data of the config ({found}); drop {flag}")
        query_dim, cand_dim = q, c
    return query_dim, cand_dim, data, model_cfg


def _import_from_args(args: argparse.Namespace) -> tuple[Path, str, str, GroupData | None]:
    """Run the import the flags ask for; ``(checkpoint, what was imported, where the weights came from, data)``."""
    query_dim, cand_dim, data, model_cfg = _feature_dims(args)
    temperature = {
        "sim_temperature": args.sim_temperature,
        "temperature_attr": args.temperature_attr,
        "temperature_form": args.temperature_form,
    }
    if args.sentence_transformers is not None:
        if data is not None and data.query_text is None:
            raise ValueError(
                "--sentence-transformers reads text, and the config's data has none to read: a table with "
                "query_text / candidate_text columns and --set data.text_mode=end_to_end"
            )
        if args.temperature_attr is not None:
            raise ValueError("--temperature-attr does not apply to --sentence-transformers; use --sim-temperature")
        path = import_sentence_transformers(
            args.sentence_transformers,
            args.out,
            towers=args.towers,
            train_layers=args.train_layers,
            max_tokens=args.max_tokens,
            sim_temperature=args.sim_temperature,
            model_config=model_cfg,
        )
        return path, ST_TARGET, str(args.sentence_transformers), data
    if query_dim is None or cand_dim is None:
        raise ValueError(
            "the feature dims are unknown: pass --query-dim and --cand-dim, or --config (and --set) "
            "of the run so they are read from its data"
        )
    methods = _json_object("--methods", args.methods, '{"query": "encode_q", "candidates": "encode_docs"}')
    common = dict(query_dim=query_dim, cand_dim=cand_dim, interface=args.interface, methods=methods, **temperature)
    if args.from_pretrained is not None:
        if args.kwargs is not None:
            raise ValueError("--kwargs does not apply to --from-pretrained: the directory's config.json holds them")
        path = import_pretrained(args.from_pretrained, args.out, target=args.target, model_config=model_cfg, **common)
        return path, args.target or str(args.from_pretrained), str(args.from_pretrained), data
    if args.target is None:
        raise ValueError("--state-dict needs --target pkg.module:Class (the class the weights belong to)")
    path = import_sft(
        args.target,
        args.state_dict,
        args.out,
        kwargs=_json_object("--kwargs", args.kwargs, '{"dim": 32}'),
        key=args.key,
        renames=[_parse_rename(r) for r in args.rename or []],
        model_config=model_cfg,
        **common,
    )
    return path, args.target, str(args.state_dict), data


def _how(ckpt: dict[str, Any], model: nn.Module) -> str:
    """How the interface was chosen: named, or recognised from the class (a factory's: from what it built)."""
    kind = ckpt["model_config"]["interface"]
    how = f"interface {interface_of(model).kind}"
    if kind != "auto":
        return how
    target = ckpt["model_config"]["target"]
    if ":" not in target:
        return f"{how}, recognised from {type(model).__name__}, the class config.json names"
    built_by = import_object(target)
    if isinstance(built_by, type):
        return f"{how}, recognised from the class"
    return f"{how}, recognised from the {type(model).__name__} that {target.rpartition(':')[2]} built"


def cmd_import_sft(args: argparse.Namespace) -> int:
    path, what, source, data = _import_from_args(args)
    ckpt = load_checkpoint(path)
    t = ckpt["model_config"]["sim_temperature"]
    model = model_from_checkpoint(ckpt, path)
    print(
        f"wrote {path}: {what} ({_how(ckpt, model)}) with the weights of {source} (query_dim {ckpt['query_dim']}, "
        f"cand_dim {ckpt['cand_dim']}, sim_temperature {t:g}"
        f"{f' read from {args.temperature_attr}' if args.temperature_attr else ''})"
    )
    if data is not None:
        share = entropy_share(model, data, t)
        print(
            f"imported policy on the data: mean entropy {share:.0%} of log G (100% = uniform) at sim_temperature {t:g}"
        )
        if share > NEAR_UNIFORM:
            print(
                "warning: the imported policy is nearly uniform over each group: if your model divides its scores "
                "by a temperature (or multiplies by a logit scale), set --sim-temperature T or --temperature-attr "
                "NAME, else RCE and GRPO start from a policy much flatter than your model's"
            )
    print(f"next: {next_run_command(path, args)}")
    return 0


def register_cli(
    subparsers: Any, data_from_config: Callable[[argparse.Namespace], tuple[GroupData, ModelConfig]]
) -> None:
    """``v3kit import-sft``: a plain state dict of your own class -> a v3kit ``sft.pt``. ``data_from_config``: the
    data and model section of the run config that ``--config`` / ``--set`` name (the run config and its data are
    the run floor's, above this one, so the command line passes the function in)."""
    p = subparsers.add_parser(
        "import-sft",
        help="make a v3kit SFT checkpoint from your own model: a state_dict file, a Hugging Face save_pretrained "
        "directory or a sentence-transformers model",
    )
    p.add_argument(
        "--target",
        metavar="MODULE:CLASS",
        help="your ranker: pkg.module:Class (importable from the current directory or PYTHONPATH), "
        "path/to/models.py:Class, or a function returning the model (pkg.module:make_ranker); with "
        "--from-pretrained, the PreTrainedModel class when config.json's auto_map/architectures do not locate it",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--state-dict",
        metavar="FILE",
        help="torch.save(model.state_dict()) output, or a .safetensors file (with --target)",
    )
    source.add_argument(
        "--from-pretrained",
        metavar="DIR",
        help="a Hugging Face model.save_pretrained(DIR) directory (config.json + model.safetensors)",
    )
    source.add_argument(
        "--sentence-transformers",
        metavar="DIR",
        help="a sentence-transformers model directory (SentenceTransformer.save(DIR)) as the policy; text data "
        "(data.text_mode: end_to_end)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the v3kit SFT checkpoint to write (e.g. sft.pt)")
    dim = cli_number(int, 1, MAX_WIDTH)
    p.add_argument("--query-dim", type=dim, help="query feature dim (or read it from the data with --config)")
    p.add_argument("--cand-dim", type=dim, help="candidate feature dim (or read it from the data with --config)")
    p.add_argument("--config", help="run config whose data gives the feature dims (and model defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, as for `run`")
    p.add_argument("--kwargs", metavar="JSON", help="extra constructor arguments, e.g. '{\"dim\": 32}'")
    p.add_argument("--key", help="entry (or key prefix) that holds the weights, e.g. ema or model.backbone")
    p.add_argument("--rename", action="append", metavar="OLD=NEW", help="rename a key prefix (repeatable)")
    p.add_argument(
        "--sim-temperature",
        type=cli_number(float, MIN_TEMPERATURE, MAX_CONFIG_FLOAT),
        help="model.sim_temperature of the policy (default 1.0; with --sentence-transformers, 0.05 for a cosine model)",
    )
    p.add_argument(
        "--temperature-attr",
        metavar="NAME",
        help="read model.sim_temperature from this attribute, buffer or parameter of your model "
        "(e.g. temperature, logit_scale; see --temperature-form). Use it only when the scores v3kit reads leave "
        "the temperature out (towers, or --methods naming a method that does not divide by it); when your "
        "forward already divides by it, leave it out (it would apply twice: refused)",
    )
    p.add_argument(
        "--temperature-form",
        choices=TEMPERATURE_FORMS,
        default="temperature",
        help="what --temperature-attr holds: temperature (scores / T), scale (scores * s) or log_scale "
        "(scores * exp(s), CLIP's logit_scale)",
    )
    p.add_argument(
        "--interface",
        choices=INTERFACES,
        help="model.interface: towers (two embedding methods) | scorer (forward(query_x, cand_x) -> "
        "scores [B, G]) | auto (default: recognised from the class)",
    )
    p.add_argument(
        "--methods",
        metavar="JSON",
        help='model.methods: your method names, e.g. \'{"query": "encode_q", "candidates": '
        '"encode_docs"}\' or \'{"score": "score"}\'',
    )
    _add_sentence_transformers_args(p)
    p.set_defaults(func=cmd_import_sft, data_from_config=data_from_config)


def _add_sentence_transformers_args(p: Any) -> None:
    """The options that apply with ``--sentence-transformers``."""
    st = p.add_argument_group("with --sentence-transformers")
    st.add_argument(
        "--towers",
        choices=("shared", "two"),
        default="shared",
        help="one encoder for queries and candidates (shared, as sentence-transformers trains) or a copy each (two)",
    )
    st.add_argument(
        "--train-layers",
        type=cli_number(int, -1, 100_000),
        default=1,
        metavar="N",
        help="train the top N transformer layers (and any dense layer after them), freeze the rest; -1 trains "
        "the whole model end to end (default 1)",
    )
    st.add_argument(
        "--max-tokens",
        type=cli_number(int, 1, 100_000),
        metavar="N",
        help="truncate texts at N tokens (default: the model's)",
    )
