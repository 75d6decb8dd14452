"""Calibrated conversion: fitted to real layer inputs, exact at full rank, never worse than plain
SVD on held-out inputs, per-layer latent sizes under a cache budget, calibrated GQA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LIBRISPEECH, save_processor, tiny_conformer, tiny_whisper

import mla_convert
from mla_convert import GQASpec, LinearSpec, MLASpec, cli
from mla_convert.calibration import CalibrationError
from mla_convert.checkpoint import convert_checkpoint


def audio_batches(count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_values": torch.randn(1, 6000, generator=generator)} for _ in range(count)]


def whisper_batches(count: int, seed: int, tokens: int) -> list[dict]:
    """Teacher-forced inputs for ``tiny_whisper()``: random features and decoder token ids."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_features": torch.randn(1, 16, 100, generator=generator),
            "decoder_input_ids": torch.randint(3, 100, (1, tokens), generator=generator),
        }
        for _ in range(count)
    ]


def conformer_logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**batch).logits for batch in batches], dim=1)


ATTENTION_OBJECTIVE = MLASpec(latent_dim=64, init="calibrated", objective="attention")


@pytest.mark.parametrize("position_mode", ["relative", "rotary", None])
@pytest.mark.parametrize(
    "spec", [MLASpec(latent_dim=64, init="calibrated"), ATTENTION_OBJECTIVE, GQASpec(kv_heads=4, init="calibrated")]
)
def test_calibrated_full_rank_conversion_is_exact(position_mode, spec):
    model = tiny_conformer(position_mode)
    probe = audio_batches(2, seed=9)
    expected = conformer_logits(model, probe)
    mla_convert.convert(model, spec, calibration=audio_batches(3, seed=1))
    assert float((conformer_logits(model, probe) - expected).norm() / expected.norm()) <= 1e-5


@pytest.mark.parametrize("position_mode", ["relative", "rotary"])
def test_calibrated_latent_beats_plain_svd_on_held_out_activations(position_mode):
    calibration, held_out = audio_batches(6, seed=2), audio_batches(3, seed=3)
    plain = mla_convert.convert(
        tiny_conformer(position_mode), MLASpec(latent_dim=12), calibration=calibration, held_out=held_out
    )
    calibrated = mla_convert.convert(
        tiny_conformer(position_mode), MLASpec(latent_dim=12, init="calibrated"), calibration=calibration,
        held_out=held_out,
    )  # fmt: skip
    assert calibrated.held_out_batches == 3 and calibrated.calibration_seconds > 0
    for ours, theirs in zip(calibrated.layers, plain.layers, strict=True):
        assert ours.k_activation_error + ours.v_activation_error < theirs.k_activation_error + theirs.v_activation_error


def test_calibrated_gqa_regroups_heads_and_keeps_a_consistent_model():
    calibration = audio_batches(4, seed=4)
    model = tiny_conformer("relative")
    report = mla_convert.convert(model, GQASpec(kv_heads=2, init="calibrated"), calibration=calibration)
    assert all(layer.k_activation_error < 1.0 for layer in report.layers)
    assert torch.isfinite(conformer_logits(model, calibration)).all()


def test_cache_budget_sets_per_layer_latents_that_spend_it_exactly(tmp_path):
    model = tiny_conformer("relative", num_hidden_layers=3)
    report = mla_convert.convert(
        model, MLASpec(cache_budget=0.125, init="calibrated"), calibration=audio_batches(4, seed=5)
    )
    latents = [layer["latent_dim"] for layer in model.config.attention_conversion["layers"].values()]
    assert sum(latents) == round(0.125 * 3 * 2 * 64)
    assert report.state_bytes_per_frame_after == sum(latents) * 4
    model.save_pretrained(tmp_path)
    reloaded = mla_convert.load(tmp_path)
    assert [layer.self_attn.attention.latent_dim for layer in reloaded.wav2vec2_conformer.encoder.layers] == latents


def test_measured_cache_budget_keeps_the_allocation_the_held_out_output_prefers():
    model = tiny_conformer("relative", num_hidden_layers=3)
    report = mla_convert.convert(
        model,
        MLASpec(cache_budget=0.125, init="calibrated"),
        calibration=audio_batches(4, seed=5),
        held_out=audio_batches(2, seed=6),
    )
    search = report.budget_search
    latents = [layer["latent_dim"] for layer in model.config.attention_conversion["layers"].values()]
    assert search["allocation"] == "measured" and search["metric"] == "kl"
    assert latents == search["ranks"] and sum(latents) == search["budget"] == round(0.125 * 3 * 2 * 64)
    divergences = {name: candidate["divergence"] for name, candidate in search["candidates"].items()}
    assert set(divergences) == {"measured", "uniform", "spectral"}
    assert divergences[search["chosen"]] == min(divergences.values())
    assert all(len(errors) >= 2 for errors in search["per_layer"].values())
    assert "cache budget 48" in report.format_table()


def test_spectral_cache_budget_needs_no_measurement():
    model = tiny_conformer("relative", num_hidden_layers=3)
    spec = MLASpec(cache_budget=0.125, init="calibrated", budget_allocation="spectral")
    report = mla_convert.convert(model, spec, calibration=audio_batches(4, seed=5))
    assert report.budget_search["allocation"] == "spectral" and "candidates" not in report.budget_search
    assert sum(report.budget_search["ranks"]) == 48


def test_whisper_budget_measurements_reuse_the_encoder_output_exactly():
    from mla_convert.hosts import adapter_for

    model = tiny_whisper().eval()
    adapter = adapter_for(model)
    batches = whisper_batches(2, seed=8, tokens=6)
    decoder_sites = adapter.sites(model, ("decoder",))
    prepared = adapter.measurement_batches(model, decoder_sites, batches)
    assert all("input_features" not in batch and "encoder_outputs" in batch for batch in prepared)
    with torch.no_grad():
        for full, reused in zip(batches, prepared, strict=True):
            assert torch.equal(model(**full).logits, model(**reused).logits)
    encoder_sites = adapter.sites(model, ("encoder",))
    assert adapter.measurement_batches(model, encoder_sites, batches) == batches


def test_whisper_decoder_calibrates_on_its_own_greedy_output_or_on_text():
    from mla_convert.hosts import adapter_for

    model = tiny_whisper()
    model.generation_config.max_length = 8

    class Processor:
        class feature_extractor:  # noqa: N801 - mimics WhisperProcessor's attribute
            @staticmethod
            def __call__(audio, sampling_rate, return_tensors):
                return type("Features", (), {"input_features": torch.randn(1, 16, 100)})

        @staticmethod
        def tokenizer(text, add_special_tokens):
            return type("Tokens", (), {"input_ids": [5, 6, 7]})

    Processor.feature_extractor = Processor.feature_extractor()
    rows = [{"audio": None, "text": "A WORD"}]
    greedy = list(adapter_for(model).calibration_inputs(model, Processor, rows, use_text=False))
    taught = list(adapter_for(model).calibration_inputs(model, Processor, rows, use_text=True))
    assert greedy[0]["decoder_input_ids"].shape[1] > 1
    assert taught[0]["decoder_input_ids"][0, :4].tolist() == [1, 5, 6, 7]
    report = mla_convert.convert(model, MLASpec(latent_dim=64, init="calibrated"), calibration=greedy + taught)
    assert all(layer.k_activation_error < 1e-5 for layer in report.layers)


def test_cli_calibrates_on_shared_audio_and_records_which_utterances(saved_conformer, tmp_path):
    output = tmp_path / "calibrated"
    dev_clean = str(LIBRISPEECH / "dev-clean")
    args = ["convert", str(saved_conformer), "--attention", "mla", "--latent-dim", "16", "--output", str(output),
            "--calibration", dev_clean, "--calibration-samples", "5", "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((output / "conversion_report.json").read_text())
    assert report["spec"]["init"] == "calibrated"
    assert len(report["calibration_ids"]) == 4 and len(report["held_out_ids"]) == 1
    assert not set(report["calibration_ids"]) & set(report["held_out_ids"])
    assert all(layer["k_activation_error"] is not None for layer in report["layers"])


def test_cli_cache_budget_is_measured_on_the_held_out_audio_and_saved_per_layer(tmp_path):
    original, output = tmp_path / "original", tmp_path / "budgeted"
    tiny_conformer("rotary").save_pretrained(original)  # rotary: the stock relative encoding is slow on 10k frames
    save_processor(original)
    dev_clean = str(LIBRISPEECH / "dev-clean")
    args = ["convert", str(original), "--attention", "mla", "--cache-budget", "0.125", "--output", str(output),
            "--calibration", dev_clean, "--calibration-samples", "5", "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((output / "conversion_report.json").read_text())
    search = report["budget_search"]
    assert search["allocation"] == "measured" and search["held_out_batches"] == 1
    config = json.loads((output / "config.json").read_text())
    latents = [layer["latent_dim"] for layer in config["attention_conversion"]["layers"].values()]
    assert latents == search["ranks"] and sum(latents) == search["budget"]
    spectral = tmp_path / "spectral"
    args[args.index(str(output))] = str(spectral)
    assert cli.main([*args, "--budget-allocation", "spectral"]) == 0
    assert json.loads((spectral / "conversion_report.json").read_text())["budget_search"]["allocation"] == "spectral"


def test_calibration_must_not_touch_the_evaluation_data(saved_conformer, tmp_path):
    dev_clean = LIBRISPEECH / "dev-clean"
    with pytest.raises(CalibrationError, match="shares 1 utterances"):
        convert_checkpoint(
            str(saved_conformer), MLASpec(latent_dim=8, init="calibrated"), tmp_path / "out",
            calibration=[str(dev_clean)], calibration_samples=3, exclude_ids=["1272-128104-0001"], progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_calibrated_init_without_audio_is_one_line(saved_conformer, tmp_path, capsys):
    args = ["convert", str(saved_conformer), "--attention", "mla", "--latent-dim", "8", "--init", "calibrated",
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(args) == 2
    assert "needs calibration audio" in capsys.readouterr().err


@pytest.mark.parametrize("position_mode", ["relative", "rotary"])
def test_hedgehog_attention_transfer_brings_linear_attention_closer_to_softmax(position_mode, tmp_path):
    calibration = audio_batches(3, seed=6)
    probe = audio_batches(2, seed=7)
    original = tiny_conformer(position_mode)
    expected = conformer_logits(original, probe)
    fixed = tiny_conformer(position_mode)
    mla_convert.convert(fixed, LinearSpec(feature_map="elu"))
    learned = tiny_conformer(position_mode)
    report = mla_convert.convert(
        learned, LinearSpec(feature_map="hedgehog", transfer_steps=150), calibration=calibration
    )
    assert all(layer.transfer_loss_after < layer.transfer_loss_before for layer in report.layers)

    def error(model):
        return float((conformer_logits(model, probe) - expected).norm() / expected.norm())

    assert error(learned) < error(fixed)
    learned.save_pretrained(tmp_path)
    assert torch.allclose(conformer_logits(mla_convert.load(tmp_path), probe), conformer_logits(learned, probe))


def test_hedgehog_on_a_whisper_decoder_learns_the_causal_pattern():
    model = tiny_whisper()
    batches = whisper_batches(3, seed=8, tokens=12)
    report = mla_convert.convert(model, LinearSpec(feature_map="hedgehog", transfer_steps=100), calibration=batches)
    assert all(layer.transfer_loss_after < layer.transfer_loss_before for layer in report.layers)


@pytest.mark.parametrize("targets", [["decoder"], ["cross"], ["encoder"]])
@pytest.mark.parametrize(
    "spec", [MLASpec(latent_dim=64, init="calibrated"), ATTENTION_OBJECTIVE, GQASpec(kv_heads=4, init="calibrated")]
)
def test_calibrated_whisper_attention_of_every_role_is_exact_at_full_rank(targets, spec):
    model = tiny_whisper()
    batches = whisper_batches(2, seed=10, tokens=9)
    with torch.no_grad():
        expected = model(**batches[0]).logits
    report = mla_convert.convert(model, spec, targets=targets, calibration=batches[1:], held_out=batches[:1])
    assert {layer.role for layer in report.layers} == set(targets)
    with torch.no_grad():
        logits = model(**batches[0]).logits
    assert float((logits - expected).norm() / expected.norm()) <= 1e-5


def test_calibrated_gqa_on_a_whisper_decoder_beats_mean_pooling_on_held_out_outputs():
    """Without positions inside the attention, each query head absorbs its own map into the group's
    shared key subspace (and each output slice its value map): far closer than one pooled head."""
    batches = whisper_batches(4, seed=12, tokens=10)
    reference = tiny_whisper()
    with torch.no_grad():
        expected = reference(**batches[0]).logits
    errors = {}
    for init in ("mean-pool", "calibrated"):
        model = tiny_whisper()
        spec = GQASpec(kv_heads=2, init=init)
        mla_convert.convert(model, spec, targets=["decoder"], calibration=batches[1:] if init == "calibrated" else None)
        with torch.no_grad():
            errors[init] = float((model(**batches[0]).logits - expected).norm() / expected.norm())
    assert errors["calibrated"] < 0.5 * errors["mean-pool"]
