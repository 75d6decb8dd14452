"""``mla-convert profile`` measures what a model really holds and costs, and ``compare`` turns runs
into one table with plots: measured K/V-state bytes equal the variant formula for every variant,
in a decoder's generate() cache, a streaming encoder's cache and a full-sequence forward."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import needs_librispeech, tiny_whisper
from test_speech_encoders import tiny_model

import mla_convert
from mla_convert import GQASpec, LinearSpec, MLASpec
from mla_convert.cli import main
from mla_convert.frontend import build_processor, char_vocabulary
from mla_convert.profiling import compare_results, profile_models
from mla_convert.profiling.compare import pareto_front

FAST = dict(seconds=[2.0], batch_size=2, new_tokens=[4], repeats=1, progress=False)
ZOO_ATTENTIONS = {
    "mha": {"type": "mha"},
    "mla": {"type": "mla", "latent_dim": 24},
    "gqa": {"type": "gqa", "kv_heads": 2},
    "linear": {"type": "linear", "feature_map": "elu"},
}
WHISPER_VARIANTS = {
    "mha": None,
    "mla": (MLASpec(latent_dim=16), ["decoder", "cross", "encoder"]),
    "gqa": (GQASpec(kv_heads=2), ["decoder", "cross", "encoder"]),
    "linear": (LinearSpec(), ["decoder", "encoder"]),
}


def save_zoo(directory, attention: str, family: str = "conformer", **overrides):
    processor = build_processor(char_vocabulary([]), [-6.0] * 80, [3.0] * 80, win_length=400, hop_length=160)
    model = tiny_model(family, attention=ZOO_ATTENTIONS[attention], vocab_size=len(processor.tokenizer), **overrides)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def whisper_processor(imported_whisper):
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(imported_whisper)


def save_whisper(directory, variant: str, processor):
    """A random 2+2-layer Whisper with the real 80-mel, 30-s front end, converted as ``variant``."""
    model = tiny_whisper()
    config = model.config
    config.num_mel_bins, config.max_source_positions = 80, 1500
    model = type(model)(config).eval()
    model.generation_config.eos_token_id = None
    if WHISPER_VARIANTS[variant] is not None:
        spec, targets = WHISPER_VARIANTS[variant]
        mla_convert.convert(model, spec, targets=targets)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def measured_rows(entry: dict) -> list[dict]:
    return [row for rows in entry["kv_state_measured"].values() for row in rows]


@pytest.mark.parametrize("variant", list(WHISPER_VARIANTS))
def test_whisper_cache_and_encoder_state_measure_what_the_formula_says(variant, whisper_processor, tmp_path):
    directory = save_whisper(tmp_path / variant, variant, whisper_processor)
    entry = profile_models([str(directory)], **FAST)["models"][0]
    measured = entry["kv_state_measured"]
    assert {row["role"] for row in measured["generate_cache"]} == {"decoder", "cross"}
    assert {row["role"] for row in measured["forward"]} == {"encoder"}
    for row in measured_rows(entry):
        assert row["measured_bytes_per_position"] == row["formula_bytes_per_position"], row
        assert row["measured_fixed_bytes"] == row["formula_fixed_bytes"], row
    assert entry["kv_state_matches_formula"]
    decoder = [row for row in measured["generate_cache"] if row["role"] == "decoder"]
    expected = {"mha": 2 * 64 * 4, "mla": 16 * 4, "gqa": 2 * 2 * 16 * 4, "linear": 0}[variant]
    assert all(row["measured_bytes_per_position"] == expected for row in decoder)
    if variant == "linear":  # nothing per token: a fixed H x F x (d + 1) sum per sequence and layer
        assert all(row["measured_fixed_bytes"] == 4 * 16 * 17 * 4 for row in decoder)


@pytest.mark.parametrize("attention", list(ZOO_ATTENTIONS))
def test_zoo_encoder_state_is_measured_in_the_forward_and_the_streaming_cache(attention, tmp_path):
    full = save_zoo(tmp_path / "full", attention)
    streaming = save_zoo(tmp_path / "streaming", attention, causal_conv=True, chunk_size=4, num_left_chunks=2)
    entries = profile_models([str(full), str(streaming)], **FAST)["models"]
    assert len(entries[0]["kv_state_measured"]["forward"]) == 2  # both layers, in a full-context forward
    assert "streaming" not in entries[0]["kv_state_measured"]  # a full-context model does not stream
    assert len(entries[1]["kv_state_measured"]["streaming"]) == 2  # both layers' streaming caches
    for entry in entries:
        for row in measured_rows(entry):
            assert row["measured_bytes_per_position"] == row["formula_bytes_per_position"], row
            assert row["measured_fixed_bytes"] == row["formula_fixed_bytes"], row
        assert entry["kv_state_matches_formula"]


def test_a_profile_records_times_memory_throughput_and_the_machine(whisper_processor, tmp_path):
    directory = save_whisper(tmp_path / "mla", "mla", whisper_processor)
    payload = profile_models([str(directory)], seconds=[1.0, 2.0], batch_size=2, new_tokens=[3, 6], repeats=2,
                             progress=False)  # fmt: skip
    entry = payload["models"][0]
    assert payload["settings"]["batch_size"] == 2 and payload["machine"]["threads"] >= 1
    assert entry["parameters"] == sum(p.numel() for p in mla_convert.load(directory).parameters())
    assert [row["seconds"] for row in entry["forward"]] == [1.0, 2.0]
    for row in entry["forward"]:
        assert len(row["runs_s"]) == 2 and row["median_s"] > 0
        assert row["peak_memory_bytes"] is not None and row["memory_kind"]
    assert [row["new_tokens"] for row in entry["decode"]] == [3, 6]
    for row in entry["decode"]:
        assert row["sequence_length"] >= row["new_tokens"]  # forced: no early end of sequence
        assert row["tokens_per_s"] == pytest.approx(2 * row["new_tokens"] / row["median_s"])
        assert row["decode_tokens_per_s"] >= row["tokens_per_s"]


def test_profile_cli_writes_json_and_refuses_bad_settings_in_one_line(tmp_path, capsys):
    directory = save_zoo(tmp_path / "mla", "mla")
    output = tmp_path / "profile.json"
    assert (
        main(["profile", str(directory), "--seconds", "1", "--repeats", "1", "--output", str(output), "--quiet"]) == 0
    )
    payload = json.loads(output.read_text())
    assert payload["kind"] == "mla_convert.profile" and payload["models"][0]["kv_state_matches_formula"]
    assert "measured = formula" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    assert main(["profile", str(directory), "--seconds", "0", "--output", str(bad)]) == 2
    assert not bad.exists()
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--seconds" in error[0]


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(100, 5.0), (50, 6.0), (50, 7.0), (25, 9.0), (80, 8.0), (10, 20.0)]
    assert pareto_front(points) == [(10, 20.0), (25, 9.0), (50, 6.0), (100, 5.0)]


@needs_librispeech
def test_compare_merges_evaluation_conversion_and_profile_runs_into_one_table_and_plots(tmp_path, capsys):
    from conftest import LIBRISPEECH

    base = save_zoo(tmp_path / "mha", "mha")
    converted = tmp_path / "mla"
    assert main(["convert", str(base), "--attention", "mla", "--latent-dim", "16", "--output", str(converted)]) == 0
    evaluation, profile = tmp_path / "eval.json", tmp_path / "profile.json"
    models = [str(base), str(converted)]
    assert main(["evaluate", *models, "--split", "dev-clean", "--data", str(LIBRISPEECH), "--limit", "2",
                 "--output", str(evaluation), "--quiet"]) == 0  # fmt: skip
    assert main(["profile", *models, "--seconds", "1", "2", "--repeats", "1", "--output", str(profile), "--quiet"]) == 0
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a run's JSON: skipped
    output = tmp_path / "comparison"
    inputs = [evaluation, profile, converted / "conversion_report.json", tmp_path / "notes.json"]
    written = compare_results(inputs, output)
    names = {path.name for path in written}
    assert {"comparison.csv", "summary.md", "wer_vs_cache.png", "time_vs_length.png", "memory.png"} <= names
    with (output / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == ["mha", "mla"]  # one row per model, from three files
    mla = rows[1]
    assert mla["wer_dev-clean"] and mla["forward_s_2s"] and mla["conversion_state_ratio"]
    assert int(mla["kv_state_bytes_per_frame"]) == 2 * 16 * 4  # two layers of a 16-wide latent
    summary = (output / "summary.md").read_text()
    assert "Baseline: mha" in summary and "(0.12×)" in summary  # 128 of 1024 bytes per frame
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "notes.json"), "--output", str(tmp_path / "none")]) == 2
    assert "none of the files" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
