"""mla_convert's own Conformer and Branchformer CTC models: ordinary HF models whose attention is
any of the conversion core's variants, and which the converter treats like any host."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import LIBRISPEECH, librispeech_utterances, needs_librispeech
from helpers import run_without_mla_convert

import mla_convert
from mla_convert.data.audio import decode_audio
from mla_convert.evaluation.kv_state import attention_report
from mla_convert.frontend import build_processor, char_vocabulary, cmvn_statistics
from mla_convert.modeling.configuration_branchformer import BranchformerConfig
from mla_convert.modeling.configuration_conformer import ConfigValueError, ConformerConfig
from mla_convert.modeling.feature_extraction_conformer import ConformerFeatureExtractor
from mla_convert.modeling.modeling_branchformer import BranchformerForCTC
from mla_convert.modeling.modeling_conformer import ConformerForCTC
from mla_convert.specs import GQASpec, MLASpec

FAMILIES = {"conformer": (ConformerConfig, ConformerForCTC), "branchformer": (BranchformerConfig, BranchformerForCTC)}
ATTENTIONS = [
    {"type": "mha"},
    {"type": "mla", "latent_dim": 32},
    {"type": "gqa", "kv_heads": 2},
    {"type": "linear", "feature_map": "elu"},
]
TINY = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=31)
FAMILY_TINY = {
    "conformer": dict(intermediate_size=128, conv_kernel_size=7),
    "branchformer": dict(cgmlp_linear_units=128, cgmlp_conv_kernel=7),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TINY, **FAMILY_TINY[family], **overrides})).eval()
    # BatchNorm starts as the identity; give it statistics so that conversions are tested on all paths
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def utterances() -> list[tuple[np.ndarray, str]]:
    if not (LIBRISPEECH / "dev-clean").is_dir():
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH}")
    return [(decode_audio(path), text) for _, path, text in librispeech_utterances("dev-clean", limit=3)]


@pytest.fixture(scope="module")
def processor(utterances):
    audios = [audio for audio, _ in utterances]
    mean, std = cmvn_statistics(audios, ConformerFeatureExtractor())
    return build_processor(char_vocabulary([text for _, text in utterances]), mean, std)


@pytest.fixture(scope="module")
def features(utterances, processor) -> dict[str, torch.Tensor]:
    audios = [audio[: 16000 * 4] for audio, _ in utterances[:2]]
    batch = processor.feature_extractor(audios, sampling_rate=16000, padding=True, return_tensors="pt")
    return {"input_features": batch.input_features, "attention_mask": batch.attention_mask}


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("family", "overrides", "key"),
    [
        ("conformer", {"attention": {"type": "flash"}}, "attention.type"),
        ("conformer", {"attention": {"type": "mla", "latent_dim": 65}}, "attention.latent_dim"),
        ("conformer", {"attention": {"type": "gqa", "kv_heads": 3}}, "attention.kv_heads"),
        ("conformer", {"attention": {"type": "mla", "latent_dim": 32, "rank": 4}}, "attention.rank"),
        ("conformer", {"position_embedding": "rotary", "hidden_size": 60}, "position_embedding"),
        ("conformer", {"subsampling": "conv2d3"}, "subsampling"),
        ("conformer", {"conv_kernel_size": 8}, "conv_kernel_size"),
        ("branchformer", {"merge_method": "sum"}, "merge_method"),
        ("branchformer", {"cgmlp_linear_units": 127}, "cgmlp_linear_units"),
    ],
)
def test_a_bad_config_fails_at_construction_naming_its_key(family, overrides, key):
    config_class, _ = FAMILIES[family]
    with pytest.raises(ConfigValueError) as error:
        config_class(**{**TINY, **FAMILY_TINY[family], **overrides})
    assert str(error.value).startswith(f"{key}:")
    assert "\n" not in str(error.value)


def test_the_attention_choice_is_stored_complete_in_config_json(tmp_path):
    config = ConformerConfig(**TINY, attention={"type": "mla", "latent_dim": 48})
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["attention"] == {"type": "mla", "latent_dim": 48, "latent_layout": "joint"}
    assert stored["auto_map"]["AutoConfig"] == "configuration_conformer.ConformerConfig"


# ------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ATTENTIONS, ids=lambda a: a["type"])
@pytest.mark.parametrize("positions", ["rel_pos", "rotary", "abs_pos"])
def test_every_attention_variant_gives_padding_independent_logits(family, attention, positions, features):
    """An utterance gets the same logits alone as in a padded batch, with every attention and
    every kind of positions (padding is masked in attention and zeroed before convolutions)."""
    model = tiny_model(family, attention=attention, position_embedding=positions)
    with torch.no_grad():
        batched = model(**features).logits
        frames = int(features["attention_mask"][1].sum())
        alone = model(features["input_features"][1:, :frames]).logits[0]
    valid = int(model._get_feat_extract_output_lengths(torch.tensor(frames)))
    assert batched.shape[-1] == TINY["vocab_size"]
    torch.testing.assert_close(batched[1, :valid], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_attention_agree_with_relative_positions(family, features):
    model = tiny_model(family)
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        sdpa = model(**features).logits
        model.config._attn_implementation = "eager"
        eager = model(**features).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_give_a_finite_ctc_loss_with_gradients(family, features):
    model = tiny_model(family).train()
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    loss = model(**features, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.lm_head.weight.grad is not None


def test_measured_kv_state_bytes_equal_the_reported_formula(features):
    """The bytes each layer's attention really keeps per frame (its ``kv_state`` tensors) are what
    the evaluation JSON reports for that model."""
    for attention in ATTENTIONS[:3]:
        model = tiny_model("conformer", attention=attention)
        kept: list[int] = []
        for layer in model.encoder.layers:
            layer.self_attn.kv_state = _recording(layer.self_attn.kv_state, kept)
        with torch.no_grad():
            model(features["input_features"][:1])
        assert sum(kept) == attention_report(model.config)["kv_state_bytes_per_frame"]


def _recording(kv_state, kept: list[int]):
    """``kv_state`` that also appends the bytes per frame of the state it returns to ``kept``."""

    def wrapped(kv_input: torch.Tensor, rotary):
        state = kv_state(kv_input, rotary)
        kept.append(sum(t[0].numel() * t.element_size() for t in state) // kv_input.shape[1])
        return state

    return wrapped


# ------------------------------------------------------------------------------------------ conversion


def relative_error(model, reference: torch.Tensor, features) -> float:
    with torch.no_grad():
        logits = model(**features).logits
    return float((logits - reference).norm() / reference.norm())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["rel_pos", "rotary"])
def test_full_rank_conversion_is_exact_and_error_grows_as_the_latent_shrinks(family, positions, features):
    original = tiny_model(family, position_embedding=positions)
    with torch.no_grad():
        reference = original(**features).logits
    errors = []
    for latent_dim in (64, 48, 32, 16):
        model = copy.deepcopy(original)
        report = mla_convert.convert(model, MLASpec(latent_dim=latent_dim))
        assert len(report.layers) == TINY["num_hidden_layers"]
        errors.append(relative_error(model, reference, features))
    assert errors[0] <= 1e-5
    assert errors == sorted(errors), errors
    gqa = copy.deepcopy(original)
    mla_convert.convert(gqa, GQASpec(kv_heads=4))  # as many K/V heads as heads: exact too
    assert relative_error(gqa, reference, features) <= 1e-5


def test_a_converted_model_reports_its_smaller_cache():
    model = tiny_model("branchformer")
    mla_convert.convert(model, MLASpec(latent_dim=16))
    report = attention_report(model.config)
    assert report["converted_layers"] == 2
    assert report["kv_state_bytes_per_frame"] == 2 * 16 * 4
    assert report["kv_state_bytes_per_frame_mha"] == 2 * 2 * 64 * 4


# ------------------------------------------------------------------------------------------ saved models


@needs_librispeech
def test_saved_models_reload_without_mla_convert_and_run_in_a_pipeline(tmp_path, processor, features, utterances):
    """Trained (MLA) Conformer and converted Branchformer: save -> a fresh process without
    mla_convert loads them with trust_remote_code, gives the same logits and transcribes in
    ``pipeline("automatic-speech-recognition")``."""
    vocab = len(processor.tokenizer)
    conformer = tiny_model("conformer", vocab_size=vocab, attention={"type": "mla", "latent_dim": 32})
    branchformer = tiny_model("branchformer", vocab_size=vocab, merge_method="learned_ave")
    mla_convert.convert(branchformer, GQASpec(kv_heads=2))
    expected = {}
    for name, model in (("conformer", conformer), ("branchformer", branchformer)):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = model(**features).logits.numpy()
    np.save(tmp_path / "features.npy", features["input_features"].numpy())
    np.save(tmp_path / "mask.npy", features["attention_mask"].numpy())
    for name, logits in expected.items():
        np.save(tmp_path / f"{name}.npy", logits)
    np.save(tmp_path / "audio.npy", utterances[0][0][: 16000 * 3])
    output = run_without_mla_convert(
        """
        import json
        import numpy as np, torch
        from transformers import AutoModelForCTC, pipeline
        features = torch.from_numpy(np.load("features.npy"))
        mask = torch.from_numpy(np.load("mask.npy"))
        result = {}
        for name in ("conformer", "branchformer"):
            model = AutoModelForCTC.from_pretrained(name, trust_remote_code=True).eval()
            with torch.no_grad():
                logits = model(input_features=features, attention_mask=mask).logits.numpy()
            asr = pipeline("automatic-speech-recognition", model=name, trust_remote_code=True)
            text = asr(np.load("audio.npy"))["text"]
            result[name] = {
                "error": float(np.abs(logits - np.load(name + ".npy")).max()),
                "class": type(model).__name__,
                "text": isinstance(text, str),
            }
        print(json.dumps(result))
        """,
        cwd=tmp_path,
    )
    result = json.loads(output.strip().splitlines()[-1])
    assert result["conformer"]["class"] == "ConformerForCTC"
    assert result["branchformer"]["class"] == "BranchformerForCTC"
    for name in expected:
        assert result[name]["error"] <= 1e-6, result
        assert result[name]["text"]


def _fsdp_units(model: torch.nn.Module) -> dict[str, int]:
    """What accelerate's FSDP ``TRANSFORMER_BASED_WRAP`` (no layer class named) makes one unit each:
    the modules of the classes in ``_no_split_modules``; and the input module it shards apart."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    units = {}
    for name in model._no_split_modules:
        cls = get_module_class_from_name(model, name)
        assert cls is not None, f"{name} is not a module of {type(model).__name__}"
        units[name] = sum(isinstance(module, cls) for module in model.modules())
    assert isinstance(model.get_input_embeddings(), torch.nn.Module)
    return units


def test_fsdp_shards_every_zoo_model_and_converted_host_layer_by_layer(tmp_path):
    from conftest import tiny_conformer
    from test_paraformer import tiny_paraformer
    from transformers import AutoModelForCTC

    for family, layer in (("conformer", "ConformerLayer"), ("branchformer", "BranchformerLayer")):
        model = tiny_model(family)
        assert _fsdp_units(model) == {layer: 2}
        assert model.get_input_embeddings() is model.encoder.embed  # the subsampling front end
    paraformer = tiny_paraformer()
    assert _fsdp_units(paraformer) == {"ConformerLayer": 2, "ParaformerDecoderLayer": 2}
    assert paraformer.get_input_embeddings() is paraformer.model.decoder.embed_tokens
    model = tiny_conformer()
    mla_convert.convert(model, MLASpec(latent_dim=16))
    model.save_pretrained(tmp_path)  # what finetune loads: the converted class
    converted = AutoModelForCTC.from_pretrained(tmp_path, trust_remote_code=True)
    assert _fsdp_units(converted) == {"Wav2Vec2ConformerEncoderLayer": 2}
    assert converted.get_input_embeddings() is converted.wav2vec2_conformer.feature_projection
