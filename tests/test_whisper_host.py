"""Whisper as a host: decoder self-attention (default), cross-attention and encoder targets; the
generate() cache holds the variant's state (the MLA latent), so the memory saving is real."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_whisper
from helpers import run_without_mla_convert

import mla_convert
from mla_convert import GQASpec, LinearSpec, MLASpec

NEW_TOKENS = 12


@pytest.fixture
def features():
    torch.manual_seed(5)
    return torch.randn(2, 16, 100)


def forward_logits(model, features):
    decoder_ids = torch.arange(3, 3 + 2 * 9).view(2, 9)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=decoder_ids).logits


def generate(model, features):
    with torch.no_grad():
        return model.generate(
            features, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, return_dict_in_generate=True
        )


def self_attention_cache_bytes(output) -> int:
    cache = output.past_key_values.self_attention_cache
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@pytest.mark.parametrize("targets", [None, ["cross"], ["encoder"], ["decoder", "cross", "encoder"]])
@pytest.mark.parametrize("spec", [MLASpec(latent_dim=64), GQASpec(kv_heads=4)], ids=["mla-full", "gqa-full"])
def test_full_rank_conversion_keeps_logits_and_greedy_tokens(targets, spec, features):
    model = tiny_whisper()
    expected_logits, expected = forward_logits(model, features), generate(model, features)
    report = mla_convert.convert(model, spec, targets=targets)
    assert {layer.role for layer in report.layers} == set(targets or ["decoder"])
    logits = forward_logits(model, features)
    assert float((logits - expected_logits).norm() / expected_logits.norm()) <= 1e-5
    assert torch.equal(generate(model, features).sequences, expected.sequences)


@pytest.mark.parametrize(
    ("spec", "values_per_token"),
    [(None, 2 * 64), (MLASpec(latent_dim=16), 16), (GQASpec(kv_heads=1), 2 * 16), (GQASpec(kv_heads=2), 2 * 2 * 16)],
)
def test_generate_cache_holds_exactly_the_formula(spec, values_per_token, features):
    model = tiny_whisper()
    if spec is not None:
        mla_convert.convert(model, spec)
    output = generate(model, features)
    batch, tokens = output.sequences.shape
    cached_tokens = tokens - 1  # the last generated token is never fed back
    layers = model.config.decoder_layers
    assert self_attention_cache_bytes(output) == batch * cached_tokens * layers * values_per_token * 4


def test_cross_attention_latent_is_computed_once_and_reused(features):
    model = tiny_whisper()
    mla_convert.convert(model, MLASpec(latent_dim=8), targets=["cross"])
    output = generate(model, features)
    cross = output.past_key_values.cross_attention_cache
    encoder_frames = model.config.max_source_positions
    assert all(layer.keys.shape == (2, 1, encoder_frames, 8) for layer in cross.layers)
    assert all(layer.values.numel() == 0 for layer in cross.layers)


def test_low_rank_and_linear_decoders_still_generate(features):
    for spec in (MLASpec(latent_dim=8), GQASpec(kv_heads=1), LinearSpec()):
        model = tiny_whisper()
        mla_convert.convert(model, spec)
        sequences = generate(model, features).sequences
        assert sequences.shape == (2, NEW_TOKENS + 1)


def test_unknown_targets_and_layers_are_refused():
    with pytest.raises(mla_convert.SpecError, match="unknown target"):
        mla_convert.convert(tiny_whisper(), MLASpec(latent_dim=8), targets=["decoder-self"])
    with pytest.raises(mla_convert.SpecError, match="latent_dim must be in 1..64"):
        mla_convert.convert(tiny_whisper(), MLASpec(latent_dim=65))


@pytest.mark.parametrize(
    ("spec", "targets"),
    [(MLASpec(latent_dim=24), ["decoder", "cross"]), (LinearSpec(), ["decoder"])],
    ids=["mla-decoder-cross", "linear-running-sums"],
)
def test_converted_whisper_reloads_without_mla_convert(spec, targets, tmp_path, features):
    model = tiny_whisper()
    mla_convert.convert(model, spec, targets=targets)
    model.save_pretrained(tmp_path)
    expected = generate(model, features).sequences
    torch.save({"features": features, "sequences": expected}, tmp_path / "expected.pt")
    out = run_without_mla_convert(
        f"""
        import torch
        from transformers import AutoModelForSpeechSeq2Seq
        model = AutoModelForSpeechSeq2Seq.from_pretrained(".", trust_remote_code=True).eval()
        model.generation_config.eos_token_id = None
        saved = torch.load("expected.pt")
        with torch.no_grad():
            tokens = model.generate(saved["features"], max_new_tokens={NEW_TOKENS}, do_sample=False, num_beams=1,
                                    return_dict_in_generate=True).sequences
        print(type(model).__name__, torch.equal(tokens, saved["sequences"]))
        """,
        cwd=tmp_path,
    )
    assert out.strip().splitlines()[-1] == "ConvertedWhisperForConditionalGeneration True"
    assert type(mla_convert.load(tmp_path)).__name__ == "ConvertedWhisperForConditionalGeneration"


def test_linear_decoder_keeps_a_fixed_running_summary_whatever_the_length(features):
    model = tiny_whisper()
    report = mla_convert.convert(model, LinearSpec())
    model.generation_config.eos_token_id = None
    assert report.state_bytes_per_frame_after == 0
    fixed = sum(layer.fixed_state_bytes_after for layer in report.layers)
    assert fixed == 2 * 4 * 16 * (16 + 1) * 4  # 2 layers x 4 heads x F 16 x (d 16 + 1) x fp32
    for new_tokens in (4, 12):
        with torch.no_grad():
            output = model.generate(features, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
        assert self_attention_cache_bytes(output) == features.shape[0] * fixed


@pytest.mark.parametrize("feature_map", ["elu", "hedgehog"])
def test_linear_decoder_generates_what_the_whole_sequence_form_computes(feature_map, features):
    """Step-by-step decoding through the running sums equals recomputing every prefix at once."""
    model = tiny_whisper()
    spec = LinearSpec(feature_map=feature_map, transfer_steps=10)
    calibration = [
        {"input_features": torch.randn(1, 16, 100), "decoder_input_ids": torch.randint(3, 100, (1, 8))}
        for _ in range(2)
    ]
    mla_convert.convert(model, spec, calibration=calibration if feature_map == "hedgehog" else None)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        output = model.generate(
            features, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        stepwise = torch.stack(output.logits, dim=1)
        whole = model(input_features=features, decoder_input_ids=output.sequences[:, :-1]).logits
    whole = whole[:, -stepwise.shape[1] :]
    assert float((stepwise - whole).abs().max()) < 1e-4
    assert torch.equal(stepwise.argmax(-1), whole.argmax(-1))
    with torch.no_grad():  # beam search reorders the running sums like any cache
        beams = model.generate(features, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape[0] == features.shape[0]
