"""Config: YAML + overrides, the seed preset, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from v3kit.config import ConfigError, RunConfig, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_seed_preset_is_the_default_and_matches_the_seed_text():
    path = ROOT / "v3kit" / "configs" / "seed.yaml"
    cfg = load_config(path)
    assert to_dict(cfg) == to_dict(RunConfig())
    # The file spells out *every* default (a missing key would load as its default and pass the check above): its
    # own keys and values are the full default config, and its header says how to regenerate it.
    text = path.read_text()
    regenerate = "dump_config(RunConfig(), 'v3kit/configs/seed.yaml')"
    assert text.startswith("# The seed's v3 settings") and regenerate in text.split("\nseed:", 1)[0]
    assert yaml.safe_load(text) == to_dict(RunConfig()), "regenerate it with the command in its header"
    # The user's seed run: RCE 3 epochs, T 2.0 -> 0.5, lr 1e-5; GRPO 8 epochs, lr 1e-5, kl_beta 0.1; old = SFT, KL to old.
    assert (cfg.rce.epochs, cfg.rce.t_start, cfg.rce.t_end, cfg.rce.lr) == (3, 2.0, 0.5, 1e-5)
    assert (cfg.grpo.epochs, cfg.grpo.lr, cfg.grpo.kl_beta) == (8, 1e-5, 0.1)
    assert (cfg.grpo.old_policy, cfg.grpo.kl_reference, cfg.grpo.samples) == ("sft", "old", "all")


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "grpo.kl_beta=0.01",
            "grpo.lr=1e-4",
            "rce.epochs=5",
            "model.hidden=[32, 16]",
            "grpo.eps_high=0.28",
            "grpo.logp_temperature=0.5",
            "data.synthetic.reward_bias=0",
        ],
    )
    assert cfg.grpo.kl_beta == 0.01 and cfg.grpo.lr == 1e-4 and cfg.rce.epochs == 5
    assert cfg.model.hidden == [32, 16] and cfg.grpo.eps_high == 0.28
    assert cfg.grpo.logp_temperature == 0.5 and isinstance(cfg.data.synthetic.reward_bias, float)


def test_yaml_file_with_exponent_floats(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("grpo:\n  lr: 3e-5\n  kl_beta: 0\nrce:\n  epochs: 10\n")
    cfg = load_config(p)
    assert cfg.grpo.lr == 3e-5 and cfg.grpo.kl_beta == 0.0 and cfg.rce.epochs == 10


@pytest.mark.parametrize(
    "override, needle",
    [
        ("grpo.kl_bta=0.1", r"unknown config key 'grpo.kl_bta'; did you mean 'grpo.kl_beta'\?"),
        ("rce.epoch=3", r"unknown config key 'rce.epoch'; did you mean 'rce.epochs'\?"),
        ("grpo.epochs=three", r"grpo.epochs expects an integer, got 'three'"),
        ("grpo.old_policy=fresh", r"grpo.old_policy must be one of"),
        ("grpo.samples=some", r"grpo.samples must be one of"),
        ("rce.temperature_target=both", r"rce.temperature_target must be one of"),
        ("grpo.logp_temperature=hot", r"grpo.logp_temperature must be 'same_as_rce_end' or a number"),
        ("grpo.kl_beta=-1", r"grpo.kl_beta must be >= 0"),
        ("kl_beta", r"must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("grpo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("grpo:\n  klbeta: 0.2\n")
    with pytest.raises(ConfigError, match="did you mean 'grpo.kl_beta'"):
        load_config(p)


def test_every_config_field_is_documented_and_the_reference_is_current():
    from v3kit import config_docs

    assert config_docs.undocumented() == []
    assert config_docs.main(["--check"]) == 0, "run `python -m v3kit.config_docs > docs/config.md`"
    keys = [k for k, _, _ in config_docs.reference()]
    assert "grpo.kl_beta" in keys and "data.synthetic.reward_bias" in keys
    assert "(docs/config.md)" in (ROOT / "README.md").read_text()


def test_field_docs_reads_the_docstring_under_each_field():
    from dataclasses import dataclass

    from v3kit.config_docs import field_docs

    @dataclass
    class Example:
        a: int = 1
        """First."""
        b: str = "x"  # a comment is not a doc
        c: float = 0.5
        """Third, on
        two lines."""

    assert field_docs(Example) == {"a": "First.", "c": "Third, on two lines."}
