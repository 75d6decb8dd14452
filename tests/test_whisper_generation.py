"""Generation with converted Whisper decoders works like any Whisper's, on every transformers release
in the declared range: cached decoding gives the same tokens as recomputing every prefix
(``use_cache=False``), and ``return_dict_in_generate``, beam search and the static cache work.

(transformers 5.24 renamed the cache keyword of ``WhisperAttention`` from ``past_key_values`` to
``cache``; a converted module that read only the old name silently decoded without its cache.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_whisper

import mla_convert
from mla_convert import GQASpec, LinearSpec, MLASpec

NEW_TOKENS = 10

VARIANTS = {
    "mla-full": (MLASpec(latent_dim=64), ["decoder"]),
    "mla-16": (MLASpec(latent_dim=16), ["decoder"]),
    "mla-16-cross": (MLASpec(latent_dim=16), ["decoder", "cross"]),
    "mla-split": (MLASpec(latent_dim=16, init="svd-split"), ["decoder"]),
    "gqa-1": (GQASpec(kv_heads=1), ["decoder"]),
    "gqa-2-cross": (GQASpec(kv_heads=2), ["cross"]),
    "linear-elu": (LinearSpec(), ["decoder"]),
    "mla-encoder": (MLASpec(latent_dim=16), ["encoder"]),
}


@pytest.fixture
def features() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(2, 16, 100)


def converted(name: str):
    spec, targets = VARIANTS[name]
    model = tiny_whisper()
    mla_convert.convert(model, spec, targets=targets)
    return model


def greedy(model, features, **kwargs):
    with torch.no_grad():
        return model.generate(features, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, **kwargs)


def generated_logits(model, features, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    output = greedy(model, features, return_dict_in_generate=True, output_logits=True, **kwargs)
    return output.sequences, torch.stack(output.logits, dim=1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_generation_gives_the_tokens_and_logits_of_uncached_generation(name, features):
    model = converted(name)
    tokens, logits = generated_logits(model, features, use_cache=True)
    expected_tokens, expected_logits = generated_logits(model, features, use_cache=False)
    assert tokens.shape == (2, NEW_TOKENS + 1)
    assert torch.equal(tokens, expected_tokens)
    assert float((logits - expected_logits).abs().max()) < 1e-4
    assert torch.equal(greedy(model, features), greedy(model, features, use_cache=False))  # the plain call too


@pytest.mark.parametrize("name", list(VARIANTS))
def test_return_dict_in_generate_returns_sequences_scores_and_the_cache(name, features):
    model = converted(name)
    output = greedy(model, features, return_dict_in_generate=True, output_scores=True)
    assert output.sequences.shape == (2, NEW_TOKENS + 1)
    assert len(output.scores) == NEW_TOKENS
    assert output.past_key_values is not None


@pytest.mark.parametrize("name", list(VARIANTS))
def test_beam_search_with_the_cache_matches_beam_search_without(name, features):
    model = converted(name)
    with torch.no_grad():
        beams = model.generate(features, max_new_tokens=6, num_beams=3, do_sample=False)
        beams_uncached = model.generate(features, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert beams.shape[0] == features.shape[0]
    assert torch.equal(beams, beams_uncached)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_static_cache_gives_the_tokens_and_logits_of_the_dynamic_cache(name, features):
    model = converted(name)
    tokens, logits = generated_logits(model, features, cache_implementation="static")
    expected_tokens, expected_logits = generated_logits(model, features)
    assert torch.equal(tokens, expected_tokens)
    assert float((logits - expected_logits).abs().max()) < 1e-4


@pytest.mark.parametrize("name", ["mla-16-cross", "gqa-1", "linear-elu", "mla-encoder"])
def test_output_attentions_returns_the_converted_layers_weights(name, features):
    model = converted(name)
    model.config._attn_implementation = "eager"
    decoder_ids = torch.arange(3, 3 + 2 * 5).view(2, 5)
    with torch.no_grad():
        output = model(input_features=features, decoder_input_ids=decoder_ids, output_attentions=True)
    for weights in (*output.decoder_attentions, *output.cross_attentions, *output.encoder_attentions):
        assert weights is not None and weights.dim() == 4
        assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-4)
    assert output.decoder_attentions[0].shape == (2, 4, 5, 5)
    assert output.cross_attentions[0].shape[-1] == model.config.max_source_positions
