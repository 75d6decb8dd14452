"""Calibration and evaluation data stay apart: ``convert --calibration`` refuses LibriSpeech's test
splits, and ``evaluate`` refuses to score a model on utterances its conversion was calibrated on
(the ids its ``conversion_report.json`` records), before loading any model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import LIBRISPEECH, save_processor, tiny_conformer

from mla_convert import MLASpec, cli
from mla_convert.calibration import CalibrationError, EvaluationSplitCalibrationError, calibration_utterances
from mla_convert.checkpoint import convert_checkpoint
from mla_convert.errors import MlaConvertError
from mla_convert.evaluation import CalibrationOverlapError, check_not_calibrated_on, evaluate_models

pytestmark = pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason="shared LibriSpeech sample not present")

# 320-sample frames like the released checkpoints (see test_evaluate.py)
REALISTIC_STRIDE = dict(conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 4, 4, 4))
CALIBRATED = MLASpec(latent_dim=24, init="calibrated")


@pytest.mark.parametrize("split", ["test-clean", "test-other"])
def test_convert_refuses_a_librispeech_test_split_as_calibration_audio(split, saved_conformer, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["convert", str(saved_conformer), "--attention", "mla", "--latent-dim", "8", "--quiet"]
    status = cli.main([*args, "--calibration", str(LIBRISPEECH / split), "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in error
    assert error.startswith("mla-convert: error: ") and f"LibriSpeech {split} is an evaluation split" in error
    assert not output.exists()


def test_a_root_without_dev_clean_is_refused_when_its_utterances_are_test_data(tmp_path):
    chapter = sorted((LIBRISPEECH / "test-other").glob("*/*"))[0]
    root = tmp_path / "root"
    shutil.copytree(chapter, root / "test-other" / chapter.parent.name / chapter.name)
    with pytest.raises(EvaluationSplitCalibrationError, match="test-other is an evaluation split") as error:
        calibration_utterances([str(root)], samples=2)
    assert isinstance(error.value, CalibrationError) and isinstance(error.value, MlaConvertError)
    assert len(calibration_utterances([str(LIBRISPEECH)], samples=2)) == 2  # a root's dev-clean is fine


@pytest.fixture(scope="module")
def calibrated_on_dev_clean(tmp_path_factory) -> Path:
    original = tmp_path_factory.mktemp("original") / "tiny-ctc"
    tiny_conformer("relative", **REALISTIC_STRIDE).save_pretrained(original)
    save_processor(original)
    output = tmp_path_factory.mktemp("converted") / "tiny-mla"
    convert_checkpoint(str(original), CALIBRATED, output, calibration=[str(LIBRISPEECH)], calibration_samples=5,
                       progress=False)  # fmt: skip
    return output


def test_evaluate_refuses_a_split_holding_the_models_calibration_utterances(
    calibrated_on_dev_clean, tmp_path, monkeypatch, capsys
):
    report = json.loads((calibrated_on_dev_clean / "conversion_report.json").read_text())
    seen = set(report["calibration_ids"]) | set(report["held_out_ids"])
    assert len(seen) == 5
    monkeypatch.setattr("mla_convert.evaluation.run.load_asr_model", lambda *a, **k: pytest.fail("a model was loaded"))
    output = tmp_path / "out" / "run.json"
    status = cli.main(["evaluate", str(calibrated_on_dev_clean), "--split", "test-clean", "dev-clean", "--quiet",
                       "--data", str(LIBRISPEECH), "--output", str(output)])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in error
    assert "was calibrated on 5 utterance(s) of dev-clean" in error and min(seen) in error
    assert not output.parent.exists()


def test_a_model_is_scored_on_splits_it_was_not_calibrated_on(calibrated_on_dev_clean, tmp_path):
    payload, _ = evaluate_models([str(calibrated_on_dev_clean)], ["test-clean"], data=LIBRISPEECH,
                                 output=tmp_path / "run.json", limit=1, progress=False)  # fmt: skip
    result = payload["results"][0]
    assert result["utterances"] == 1 and result["calibration_utterances"] == 5


def test_on_the_hub_a_model_calibrated_on_hub_audio_is_refused_dev_clean():
    report = {"calibration_sources": ["hub"], "calibration_ids": ["1272-128104-0000"], "held_out_ids": []}
    with pytest.raises(CalibrationOverlapError, match="calibrated on 1 utterance"):
        check_not_calibrated_on("m", report, "dev-clean", "hub")
    check_not_calibrated_on("m", report, "test-clean", "hub")  # its ids are checked as they stream
