"""One rule for "is this artifact still valid for this config?": signatures, fingerprints, named changes."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from v3kit.config import load_config, to_dict
from v3kit.provenance import config_changes, fingerprint, flatten, signature


def test_signature_holds_the_seed_and_the_named_sections_only():
    cfg = load_config(None, ["seed=3", "grpo.kl_beta=0.5"])
    sig = signature(cfg, "data", "sft")
    assert set(sig) == {"seed", "data", "sft"} and sig["seed"] == 3
    assert sig["data"] == json.loads(json.dumps(to_dict(cfg)["data"]))
    # A GRPO change does not touch what SFT was made from; an SFT change does.
    assert signature(load_config(None, ["seed=3"]), "data", "sft") == sig
    assert signature(load_config(None, ["seed=3", "sft.epochs=2"]), "data", "sft") != sig


def test_fingerprint_is_the_sha1_of_sorted_json_and_ignores_key_order():
    obj = {"b": [1, 2], "a": {"y": 1.5, "x": None}}
    expected = hashlib.sha1(('{"a": {"x": null, "y": 1.5}, "b": [1, 2]}' + "s").encode()).hexdigest()[:16]
    assert fingerprint(obj, "s") == expected
    assert fingerprint({"a": {"x": None, "y": 1.5}, "b": [1, 2]}, "s") == expected
    assert fingerprint(obj) != fingerprint(obj, "s")


def test_flatten_and_config_changes_name_the_differing_keys():
    before = flatten({"grpo": {"kl_beta": 0.1, "epochs": 8}, "model": {"kwargs": {"a": 1}}, "seed": 0})
    assert before == {"grpo.kl_beta": 0.1, "grpo.epochs": 8, "model.kwargs": {"a": 1}, "seed": 0}
    now = {**before, "grpo.kl_beta": 0.2, "grpo.epochs": 9}
    assert config_changes(before, now) == "grpo.epochs: 8 -> 9, grpo.kl_beta: 0.1 -> 0.2"
    assert config_changes(before, now, ignore=("grpo.epochs",)) == "grpo.kl_beta: 0.1 -> 0.2"
    assert config_changes(before, dict(before)) == ""


def test_the_keys_outside_the_experiment_are_config_fields_and_every_copy_derives_from_them():
    from v3kit.ablate.runner import _config_hash
    from v3kit.config import RunConfig
    from v3kit.doctor.grid import run_overrides
    from v3kit.pipeline import RESUMABLE_CHANGES
    from v3kit.provenance import NOT_EXPERIMENT_KEYS, RUNNER_KEYS

    top = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(NOT_EXPERIMENT_KEYS) <= top and set(RUNNER_KEYS) <= top  # a renamed field fails here
    assert set(NOT_EXPERIMENT_KEYS) <= set(RESUMABLE_CHANGES)
    other = {
        "run_dir": "run_dir=elsewhere",
        "progress": "progress=false",
        "device": "device=cpu",
        "threads": "threads=3",
        "candidate_table": "candidate_table=false",
        "log_every": "log_every=1",
        "report_to": "report_to=[tensorboard]",
        "seed": "seed=7",
    }
    assert set(other) == set(NOT_EXPERIMENT_KEYS) | set(RUNNER_KEYS)
    base = load_config(None, [])
    for key, override in other.items():
        cfg = load_config(None, [override])
        assert (_config_hash(cfg) == _config_hash(base)) == (key != "seed"), key  # only the seed is in the hash
        assert (key in RUNNER_KEYS) == (run_overrides(cfg) == []), key  # a doctor grid's base leaves runner keys out
