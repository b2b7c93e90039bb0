"""Bad input refused with one clear line, at the earliest point: config values, data rows, checkpoints, CLI."""

from __future__ import annotations

import dataclasses

import pytest

from v3kit.config import ConfigError, RunConfig, all_keys, load_config


def _float_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every config key whose type admits a float, found from the dataclass tree (not a hand-kept list)."""
    import typing

    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _float_keys(hint, f"{prefix}{name}.")
        elif hint is float or float in typing.get_args(hint):
            keys.append(f"{prefix}{name}")
    return keys


def test_float_keys_cover_the_ones_that_trained_to_nan():
    keys = _float_keys()
    assert {"grpo.lr", "grpo.kl_beta", "grpo.baseline", "grpo.adv_eps", "rce.t_end"} <= set(keys)
    assert set(keys) <= set(all_keys())


@pytest.mark.parametrize("bad", [".inf", "-.inf", ".nan", "nan", "inf", "1e400"])
def test_every_float_key_refuses_non_finite_values_naming_the_key(bad):
    for key in _float_keys():
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be a finite number"):
            load_config(None, [f"{key}={bad}"])


def test_non_finite_in_a_config_file_is_refused_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  kl_beta: .nan\n")
    with pytest.raises(ConfigError, match="grpo.kl_beta must be a finite number"):
        load_config(path)
    assert load_config(None, ["grpo.kl_beta=0.5", "grpo.lr=1e-4"]).grpo.lr == 1e-4  # finite values still load
