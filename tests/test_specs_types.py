"""Spec fields are type-checked on construction: a wrong type is one clear SpecError, never a crash later.

``True`` is an ``int`` to Python, but ``MLASpec(latent_dim=True)`` is a mistake, not a one-value latent.
"""

from __future__ import annotations

import numpy as np
import pytest

from mla_convert import GQASpec, LinearSpec, MLASpec, SpecError, spec_from_dict


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MLASpec(latent_dim=1.5), "MLASpec.latent_dim must be an integer (or None), got 1.5 (float)"),
        (lambda: MLASpec(latent_dim=True), "MLASpec.latent_dim must be an integer (or None), got True (bool)"),
        (lambda: MLASpec(latent_dim="96"), "MLASpec.latent_dim must be an integer (or None), got '96' (str)"),
        (lambda: MLASpec(cache_budget=True), "MLASpec.cache_budget must be a number (or None), got True (bool)"),
        (lambda: MLASpec(cache_budget="0.25"), "MLASpec.cache_budget must be a number (or None), got '0.25' (str)"),
        (lambda: MLASpec(latent_dim=8, balance_kv=1), "MLASpec.balance_kv must be True or False, got 1 (int)"),
        (lambda: MLASpec(latent_dim=8, damping=False), "MLASpec.damping must be a number, got False (bool)"),
        (lambda: MLASpec(latent_dim=8, init=None), "MLASpec.init must be a string, got None (NoneType)"),
        (lambda: MLASpec(latent_dim=8, objective=1), "MLASpec.objective must be a string, got 1 (int)"),
        (lambda: GQASpec(kv_heads="2"), "GQASpec.kv_heads must be an integer, got '2' (str)"),
        (lambda: GQASpec(kv_heads=False), "GQASpec.kv_heads must be an integer, got False (bool)"),
        (lambda: GQASpec(kv_heads=2.0), "GQASpec.kv_heads must be an integer, got 2.0 (float)"),
        (lambda: LinearSpec(feature_map=None), "LinearSpec.feature_map must be a string, got None (NoneType)"),
        (lambda: LinearSpec(transfer_steps=True), "LinearSpec.transfer_steps must be an integer, got True (bool)"),
        (lambda: LinearSpec(transfer_steps=0), "LinearSpec.transfer_steps must be at least 1, got 0"),
    ],
)
def test_wrong_field_types_raise_one_clear_spec_error(make, message):
    with pytest.raises(SpecError) as raised:
        make()
    assert str(raised.value) == message
    assert "\n" not in str(raised.value)


def test_spec_errors_are_value_errors_too():
    with pytest.raises(ValueError):
        GQASpec(kv_heads="2")


@pytest.mark.parametrize(
    "spec",
    [
        MLASpec(latent_dim=np.int64(96)),  # sizes computed with numpy are integers too
        MLASpec(cache_budget=0.125, init="calibrated"),
        MLASpec(cache_budget=1),  # validate() checks the range, not the type
        MLASpec(latent_dim=8, damping=0),
        GQASpec(kv_heads=np.int32(2)),
        LinearSpec(feature_map="hedgehog", transfer_steps=10),
    ],
)
def test_right_types_are_accepted(spec):
    assert spec.attention in {"mla", "gqa", "linear"}


def test_specs_read_from_a_config_are_checked_the_same_way():
    assert spec_from_dict({"attention": "gqa", "kv_heads": 2}) == GQASpec(kv_heads=2)
    with pytest.raises(SpecError, match=r"GQASpec.kv_heads must be an integer, got '2' \(str\)"):
        spec_from_dict({"attention": "gqa", "kv_heads": "2"})
    with pytest.raises(SpecError, match="unknown mla spec field.*latent_size"):
        spec_from_dict({"attention": "mla", "latent_size": 8})
