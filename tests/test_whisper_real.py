"""On the real Whisper tiny.en: lossless conversions keep transcripts, and the cache shrinks as stated."""

from __future__ import annotations

import pytest
import soundfile as sf
import torch
from conftest import librispeech_utterances

import mla_convert
from mla_convert import GQASpec, MLASpec


@pytest.fixture(scope="module")
def whisper(imported_whisper):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(imported_whisper)
    rows = librispeech_utterances("dev-clean", limit=3)
    audio = [sf.read(path, dtype="float32")[0] for _, path, _ in rows]
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features

    def fresh():
        return WhisperForConditionalGeneration.from_pretrained(imported_whisper).eval()

    return fresh, processor, features


def greedy(model, features):
    with torch.inference_mode():
        return model.generate(features, num_beams=1, do_sample=False, return_dict_in_generate=True)


def teacher_forced_logits(model, features, sequences):
    with torch.inference_mode():
        return model(input_features=features, decoder_input_ids=sequences).logits


@pytest.mark.parametrize("spec", [MLASpec(latent_dim=384), GQASpec(kv_heads=6)], ids=["mla-384", "gqa-6"])
def test_lossless_decoder_conversion_keeps_transcripts_and_logits(whisper, spec):
    fresh, processor, features = whisper
    original = fresh()
    expected = greedy(original, features)
    expected_logits = teacher_forced_logits(original, features, expected.sequences)
    converted = fresh()
    mla_convert.convert(converted, spec)
    output = greedy(converted, features)
    assert processor.batch_decode(output.sequences, skip_special_tokens=True) == processor.batch_decode(
        expected.sequences, skip_special_tokens=True
    )
    assert torch.equal(output.sequences, expected.sequences)
    logits = teacher_forced_logits(converted, features, expected.sequences)
    assert float((logits - expected_logits).norm() / expected_logits.norm()) <= 1e-5


@pytest.mark.parametrize(("latent_dim", "values_per_token"), [(None, 2 * 384), (384, 384), (96, 96), (48, 48)])
def test_decoder_cache_after_generate_holds_the_formula(whisper, latent_dim, values_per_token):
    fresh, _, features = whisper
    model = fresh()
    if latent_dim is not None:
        mla_convert.convert(model, MLASpec(latent_dim=latent_dim))
    output = greedy(model, features[:1])
    cache = output.past_key_values.self_attention_cache
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    tokens = cache.get_seq_length()
    assert tokens >= output.sequences.shape[1] - 1 > 3
    assert measured == tokens * model.config.decoder_layers * values_per_token * 4
