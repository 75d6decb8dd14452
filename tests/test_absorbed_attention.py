"""Decoding pays for the smaller cache: an MLA decoder attends on its latent cache (absorbed
``W_uk`` / ``W_uv``, nothing expanded) when that needs fewer multiply-adds, with the expanded
form's tokens and logits; GQA's shared K/V heads reach the kernel without being repeated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import soundfile as sf
import torch
from conftest import librispeech_utterances, needs_librispeech, tiny_whisper
from helpers import run_without_mla_convert

import mla_convert
from mla_convert import GQASpec, MLASpec
from mla_convert.modeling.attention_base import AttentionGeometry
from mla_convert.modeling.attention_gqa import GroupedQueryAttention
from mla_convert.modeling.attention_mla import MultiHeadLatentAttention

NEW_TOKENS = 10


def converted_whisper(spec, targets=("decoder", "cross"), implementation: str = "sdpa"):
    model = tiny_whisper()
    mla_convert.convert(model, spec, targets=list(targets))
    model.config._attn_implementation = implementation
    return model


def greedy_with_logits(model, features, absorb: str):
    model.config.mla_absorb = absorb
    with torch.no_grad():
        output = model.generate(
            features,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return output.sequences, torch.stack(output.logits, dim=1)


class AbsorptionCounter:
    """Counts the calls in which an MLA module chose the absorbed form."""

    def __init__(self, monkeypatch) -> None:
        self.absorbed = 0
        self.expanded = 0
        original = MultiHeadLatentAttention.absorbs

        def absorbs(module, query_length, key_length):
            chosen = original(module, query_length, key_length)
            if chosen:
                self.absorbed += 1
            else:
                self.expanded += 1
            return chosen

        monkeypatch.setattr(MultiHeadLatentAttention, "absorbs", absorbs)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("init", ["svd", "svd-split"])
def test_absorbed_decoding_gives_the_expanded_tokens_and_logits(init, implementation, monkeypatch):
    model = converted_whisper(MLASpec(latent_dim=16, init=init), implementation=implementation)
    torch.manual_seed(5)
    features = torch.randn(2, 16, 100)
    expected_tokens, expected_logits = greedy_with_logits(model, features, "never")
    counter = AbsorptionCounter(monkeypatch)
    tokens, logits = greedy_with_logits(model, features, "always")
    assert counter.absorbed > 0 and counter.expanded == 0
    assert torch.equal(tokens, expected_tokens)
    assert torch.allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)
    auto_tokens, auto_logits = greedy_with_logits(model, features, "auto")
    assert torch.equal(auto_tokens, expected_tokens)
    assert torch.allclose(auto_logits, expected_logits, atol=1e-5, rtol=1e-5)


def test_auto_absorbs_a_decode_step_and_long_cross_attention_but_not_prefill_training_or_rotary():
    config = SimpleNamespace(_attn_implementation="sdpa")
    geometry = AttentionGeometry(hidden_size=384, num_heads=6)
    module = MultiHeadLatentAttention(geometry, "none", config, latent_dim=192).eval()
    assert module.absorbs(1, 200)  # one new token against its cache
    assert module.absorbs(4, 1500)  # a few tokens against Whisper's 1500 encoder frames
    assert not module.absorbs(1500, 1500)  # a full-sequence encoder / prefill: expanding is cheaper
    module.train()
    assert not module.absorbs(1, 200)
    rotary = MultiHeadLatentAttention(geometry, "rotary", config, latent_dim=192).eval()
    assert not rotary.absorbs(1, 200)  # keys are rotated between the up-projection and k_proj
    config.mla_absorb = "never"
    assert not module.eval().absorbs(1, 200)
    config.mla_absorb = "sometimes"
    with pytest.raises(ValueError, match="mla_absorb"):
        module.absorbs(1, 200)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", ["joint", "split"])
@pytest.mark.parametrize("position_mode", ["none", "relative"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale_query", [False, True])
def test_absorbed_attention_equals_expanded_for_every_layout_mask_and_kernel(
    implementation, layout, position_mode, causal, scale_query
):
    torch.manual_seed(0)
    config = SimpleNamespace(_attn_implementation=implementation, mla_absorb="never")
    geometry = AttentionGeometry(64, 4, scale_query=scale_query)
    module = MultiHeadLatentAttention(
        geometry, position_mode, config, latent_dim=32, latent_layout=layout, is_causal=causal
    ).eval()
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    hidden = torch.randn(2, 7, 64)
    positions = torch.randn(1, 13, 64) if position_mode == "relative" else None
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[1, :, :, 5:] = False  # the second sequence is padded
    if causal:
        mask &= torch.ones(7, 7, dtype=torch.bool).tril()
    for attention_mask in (None, mask, torch.zeros(2, 1, 7, 7).masked_fill(~mask, torch.finfo(torch.float32).min)):
        with torch.no_grad():
            config.mla_absorb = "never"
            expected, expected_weights = module(
                hidden, attention_mask=attention_mask, position_embeddings=positions, output_attentions=True
            )
            config.mla_absorb = "always"
            output, weights = module(
                hidden, attention_mask=attention_mask, position_embeddings=positions, output_attentions=True
            )
        assert (output - expected).abs().max() < 1e-5
        if implementation == "eager":  # the weights over the latent are the weights over the keys
            assert weights.shape == (2, 4, 7, 7)
            assert (weights - expected_weights).abs().max() < 1e-5


class KernelSpy:
    """Records the K/V head count every ``scaled_dot_product_attention`` call receives."""

    def __init__(self, monkeypatch) -> None:
        self.key_heads: list[int] = []
        original = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, *args, **kwargs):
            self.key_heads.append(key.shape[1])
            return original(query, key, value, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 6])
def test_grouped_query_attention_equals_repeated_heads(implementation, causal, length):
    torch.manual_seed(1)
    config = SimpleNamespace(_attn_implementation=implementation)
    module = GroupedQueryAttention(AttentionGeometry(64, 8), "none", config, kv_heads=2, is_causal=causal).eval()
    hidden = torch.randn(2, length, 64)
    query = module.project_query(hidden, None)
    key, value = module.kv_state(hidden, None)
    causal_mask = torch.ones(length, length, dtype=torch.bool).tril() if causal else None
    padded = torch.ones(2, 1, length, length, dtype=torch.bool)
    padded[1, ..., max(length - 1, 1) :] = False
    if causal_mask is not None:
        padded &= causal_mask
    for mask in (None, padded):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query,
            key.repeat_interleave(4, dim=1),
            value.repeat_interleave(4, dim=1),
            attn_mask=mask if mask is not None else causal_mask,
            scale=module.scaling,
        ).transpose(1, 2)
        with torch.no_grad():
            output, _ = module.softmax_attention(query, key, value, mask, None)
        assert (output - expected).abs().max() < 1e-5


def test_gqa_generation_hands_the_kernel_only_the_shared_heads(monkeypatch):
    model = converted_whisper(GQASpec(kv_heads=2), targets=("decoder",))
    spy = KernelSpy(monkeypatch)
    with torch.no_grad():
        model.generate(torch.randn(2, 16, 100), max_new_tokens=4, do_sample=False, num_beams=1)
    # the converted decoder's calls see 2 K/V heads; the unconverted layers' see 4
    assert 2 in spy.key_heads and set(spy.key_heads) <= {2, 4}


@needs_librispeech
def test_absorbed_decoding_keeps_the_bundled_tiny_en_tokens_on_test_clean(imported_whisper, monkeypatch):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(imported_whisper).eval()
    mla_convert.convert(model, MLASpec(latent_dim=192), targets=["decoder", "cross"])
    processor = WhisperProcessor.from_pretrained(imported_whisper)
    audio = [sf.read(path, dtype="float32")[0] for _, path, _ in librispeech_utterances("test-clean", limit=4)]
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    counter = AbsorptionCounter(monkeypatch)
    results = {}
    for absorb in ("never", "auto"):
        model.config.mla_absorb = absorb
        with torch.no_grad():
            results[absorb] = model.generate(features, max_new_tokens=60, do_sample=False, num_beams=1)
    assert counter.absorbed > 0  # "auto" chose the latent for the decode steps
    assert torch.equal(results["auto"], results["never"])


def test_absorbed_decoding_runs_in_the_remote_code_without_mla_convert(tmp_path):
    model = converted_whisper(MLASpec(latent_dim=16))
    model.save_pretrained(tmp_path / "model")
    torch.save(torch.randn(1, 16, 100), tmp_path / "features.pt")
    output = run_without_mla_convert(
        f"""
        import torch
        from transformers import AutoModelForSpeechSeq2Seq
        model = AutoModelForSpeechSeq2Seq.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        features = torch.load({str(tmp_path / "features.pt")!r})
        runs = []
        for absorb in ("never", "always"):
            model.config.mla_absorb = absorb
            with torch.no_grad():
                runs.append(model.generate(features, max_new_tokens=8, do_sample=False, num_beams=1))
        print(torch.equal(*runs))
        """,
        tmp_path,
    )
    assert output.strip().endswith("True")
