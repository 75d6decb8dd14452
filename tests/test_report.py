"""The conversion report: cache bytes follow the formula, activation errors on real inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_conformer

import mla_convert
from mla_convert import GQASpec, LinearSpec, MLASpec


@pytest.mark.parametrize(
    ("spec", "values_per_frame"),
    [(MLASpec(latent_dim=24), 24), (MLASpec(latent_dim=24, init="svd-split"), 24), (GQASpec(kv_heads=2), 2 * 2 * 16)],
)
def test_state_bytes_per_frame_follow_the_formula(spec, values_per_frame):
    report = mla_convert.convert(tiny_conformer(), spec)
    for layer in report.layers:
        assert layer.state_bytes_per_frame_before == 2 * 64 * 4
        assert layer.state_bytes_per_frame_after == values_per_frame * 4
    assert report.state_bytes_per_frame_after == 2 * values_per_frame * 4


def test_state_bytes_count_the_models_dtype():
    model = tiny_conformer().to(torch.float16)
    report = mla_convert.convert(model, MLASpec(latent_dim=32))
    assert report.dtype == "float16"
    assert report.layers[0].state_bytes_per_frame_after == 32 * 2
    assert next(model.parameters()).dtype == torch.float16


def test_linear_attention_keeps_a_fixed_size_state():
    report = mla_convert.convert(tiny_conformer(), LinearSpec())
    layer = report.layers[0]
    assert layer.state_bytes_per_frame_after == 0
    assert layer.fixed_state_bytes_after == 4 * 16 * 17 * 4


def test_activation_errors_are_measured_on_calibration_audio():
    torch.manual_seed(3)
    calibration = [{"input_values": torch.randn(1, 6000)} for _ in range(2)]
    full = mla_convert.convert(tiny_conformer("rotary"), MLASpec(latent_dim=64), calibration=calibration)
    small = mla_convert.convert(tiny_conformer("rotary"), MLASpec(latent_dim=8), calibration=calibration)
    assert full.calibration_batches == 2
    assert all(layer.k_activation_error < 1e-5 and layer.v_activation_error < 1e-5 for layer in full.layers)
    assert all(0.05 < layer.k_activation_error < 1.5 for layer in small.layers)


def test_report_serialises_to_json_and_a_table():
    report = mla_convert.convert(tiny_conformer(), MLASpec(latent_dim=16))
    data = json.loads(report.to_json())
    assert data["spec"] == {"attention": "mla", "latent_dim": 16, "init": "svd"}
    assert data["totals"]["state_ratio"] == pytest.approx(16 / 128)
    table = report.format_table()
    assert "encoder.layers.1.self_attn" in table and "12.5% of the original" in table
