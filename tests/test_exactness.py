"""At full rank a conversion is the original model; below it, more rank means less error."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from conftest import tiny_conformer

import mla_convert
from mla_convert import GQASpec, LinearSpec, MLASpec

POSITION_MODES = ["relative", "rotary", None]


def logits(model, batch):
    values, mask = batch
    with torch.no_grad():
        return model(values, attention_mask=mask).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("position_mode", POSITION_MODES)
@pytest.mark.parametrize(
    "spec",
    [MLASpec(latent_dim=64), MLASpec(latent_dim=128, init="svd-split"), GQASpec(kv_heads=4)],
    ids=["mla-joint-full", "mla-split-full", "gqa-full"],
)
def test_full_rank_conversion_reproduces_the_original_logits(position_mode, spec, audio_batch):
    model = tiny_conformer(position_mode)
    expected = logits(model, audio_batch)
    report = mla_convert.convert(model, spec)
    assert relative(logits(model, audio_batch), expected) <= 1e-5
    assert all(layer.k_weight_error < 1e-5 and layer.v_weight_error < 1e-5 for layer in report.layers)


@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_full_rank_holds_for_the_eager_attention_kernel_too(position_mode, audio_batch):
    model = tiny_conformer(position_mode)
    model.set_attn_implementation("eager")
    expected = logits(model, audio_batch)
    mla_convert.convert(model, MLASpec(latent_dim=64))
    assert relative(logits(model, audio_batch), expected) <= 1e-5


@pytest.mark.parametrize("position_mode", POSITION_MODES)
@pytest.mark.parametrize("init", ["svd", "svd-split"])
def test_reconstruction_error_strictly_decreases_as_the_latent_grows(position_mode, init, audio_batch):
    errors = []
    for latent_dim in (8, 16, 32, 48, 64):
        model = tiny_conformer(position_mode)
        report = mla_convert.convert(model, MLASpec(latent_dim=latent_dim, init=init))
        errors.append(sum(layer.k_weight_error + layer.v_weight_error for layer in report.layers))
    assert all(later < earlier for earlier, later in pairwise(errors)), errors


def test_fewer_kv_heads_cost_more_error():
    errors = []
    for kv_heads in (1, 2, 4):
        report = mla_convert.convert(tiny_conformer(), GQASpec(kv_heads=kv_heads))
        errors.append(sum(layer.k_weight_error for layer in report.layers))
    assert errors[0] > errors[1] > errors[2] == 0.0


@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_linear_attention_keeps_projections_and_runs_with_padding(position_mode, audio_batch):
    model = tiny_conformer(position_mode)
    report = mla_convert.convert(model, LinearSpec())
    out = logits(model, audio_batch)
    assert torch.isfinite(out).all()
    assert all(layer.k_weight_error == 0 and layer.v_weight_error == 0 for layer in report.layers)
    noted = any("relative-position" in note for note in report.approximations)
    assert noted == (position_mode == "relative")


def test_padding_does_not_leak_into_real_frames(audio_batch):
    """Frames of a padded utterance must not depend on what is in the padding."""
    for spec in (None, MLASpec(latent_dim=16), GQASpec(kv_heads=2), LinearSpec()):
        model = tiny_conformer("relative")
        if spec is not None:
            mla_convert.convert(model, spec)
        values, mask = audio_batch
        noisy = values.clone()
        noisy[1, 5000:] = torch.randn(3000)
        with torch.no_grad():
            a = model(values, attention_mask=mask).logits[1, :10]
            b = model(noisy, attention_mask=mask).logits[1, :10]
        assert torch.allclose(a, b, atol=1e-5), spec


def test_only_the_requested_layers_are_converted():
    model = tiny_conformer(num_hidden_layers=3)
    report = mla_convert.convert(model, MLASpec(latent_dim=16), layers=[1])
    assert [layer.path for layer in report.layers] == ["encoder.layers.1.self_attn"]
    assert list(model.config.attention_conversion["layers"]) == ["encoder.layers.1.self_attn"]


def test_the_callers_config_object_is_not_mutated():
    model = tiny_conformer()
    shared = model.config
    mla_convert.convert(model, MLASpec(latent_dim=16))
    assert type(shared).__name__ == "Wav2Vec2ConformerConfig"
    assert model.config.model_type == "mla_convert_wav2vec2_conformer"
    assert all(getattr(m, "config", model.config) is model.config for m in model.modules())
