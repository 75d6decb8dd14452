"""``mla-convert push`` of mla_convert's own Conformer / Branchformer models that were trained, not converted:
the dry-run folder holds the weights and the remote code, its card says what the model is, its K/V state
and how it was trained (never naming a local path), and the plan's integrity checks apply to it too.

No network: HF_HUB_OFFLINE=1 (conftest); ``push --dry-run`` needs none.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_processor, tiny_conformer
from helpers import run_without_mla_convert
from test_hub import _evaluation

from mla_convert.cli import main
from mla_convert.data import HUB_DATASET
from mla_convert.evaluation import attention_report
from mla_convert.frontend import build_processor, char_vocabulary
from mla_convert.hub import parse_front_matter
from mla_convert.hub.card_trained import TRAINING_RESULT, TRAINING_SUMMARY
from mla_convert.hub.plan import plan_upload
from mla_convert.modeling.configuration_branchformer import BranchformerConfig
from mla_convert.modeling.configuration_conformer import ConformerConfig
from mla_convert.modeling.modeling_branchformer import BranchformerForCTC
from mla_convert.modeling.modeling_conformer import ConformerForCTC

REPO = "me/x"
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _save(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    build_processor(char_vocabulary(), None, None).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def conformer_mla(tmp_path_factory) -> tuple[Path, ConformerForCTC]:
    torch.manual_seed(0)
    config = ConformerConfig(
        vocab_size=len(char_vocabulary()), intermediate_size=128, attention={"type": "mla", "latent_dim": 32}, **TINY
    )
    model = ConformerForCTC(config).eval()
    return _save(model, tmp_path_factory.mktemp("trained") / "conformer-mla32"), model


@pytest.fixture(scope="module")
def branchformer_mha(tmp_path_factory) -> tuple[Path, BranchformerForCTC]:
    torch.manual_seed(0)
    config = BranchformerConfig(vocab_size=len(char_vocabulary()), cgmlp_linear_units=128, **TINY)
    model = BranchformerForCTC(config).eval()
    return _save(model, tmp_path_factory.mktemp("trained") / "branchformer-mha"), model


def _push(*argv: str) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["push", *argv])
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def conformer_upload(conformer_mla, tmp_path_factory) -> tuple[Path, Path]:
    """``mla-convert push DIR --repo-id me/x --eval-json E --dry-run OUT``: (OUT, E)."""
    directory, _ = conformer_mla
    root = tmp_path_factory.mktemp("conformer_upload")
    eval_json = root / "eval-run.json"
    eval_json.write_text(
        json.dumps(_evaluation({str(directory): directory}, {(str(directory), "test-clean"): (3, 50)}))
    )
    out = root / "upload"
    code, printed = _push(str(directory), "--repo-id", REPO, "--eval-json", str(eval_json), "--dry-run", str(out))
    assert code == 0 and f"would upload to {REPO}" in printed
    return out, eval_json


# ------------------------------------------------------------------------------------------ dry run


def test_a_trained_conformer_pushes_its_weights_remote_code_and_a_card(conformer_mla, conformer_upload):
    directory, model = conformer_mla
    out, _ = conformer_upload
    assert {p.name for p in out.iterdir()} == {p.name for p in directory.iterdir()} | {"README.md"}
    assert (out / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()
    assert {"modeling_conformer.py", "attention_mla.py", "feature_extraction_conformer.py"} <= {
        p.name for p in out.iterdir()
    }
    card = (out / "README.md").read_text()
    meta = parse_front_matter(card)
    assert meta["pipeline_tag"] == "automatic-speech-recognition" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["mla-convert", "speech", "conformer", "mla", "multi-head-latent-attention", "custom_code"]
    assert "base_model" not in meta and meta["license"] == "other"
    assert meta["model-index"][0]["results"][0]["metrics"][0] == {"type": "wer", "value": 6.0, "name": "WER"}

    kv = attention_report(model.config)
    own, mha = kv["kv_state_bytes_per_frame"], kv["kv_state_bytes_per_frame_mha"]
    assert (own, mha) == (2 * 32 * 4, 2 * 2 * 64 * 4)  # 2 layers × latent 32 vs 2 layers × 2·hidden, float32
    assert "a Conformer CTC model (ESPnet layout) trained with `mla_convert`" in card
    assert "its self-attention multi-head latent attention (MLA), latent 32 per layer" in card
    assert f"K/V state: {own} B per encoder frame (25.0% of multi-head attention's {mha} B, 4.0× smaller)" in card
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card
    assert "| **this model** | test-clean | 6.00% |" in card
    assert "No training record was found" in card and "an unrecorded amount of data" in card
    assert f'AutoModelForCTC.from_pretrained("{REPO}", trust_remote_code=True)' in card
    assert f'pipeline("automatic-speech-recognition", model="{REPO}", trust_remote_code=True)' in card
    assert str(directory.parent) not in card


def test_the_pushed_folder_loads_as_the_card_says_without_mla_convert(conformer_mla, conformer_upload, tmp_path):
    _, model = conformer_mla
    out, _ = conformer_upload
    torch.manual_seed(1)
    features = torch.randn(1, 60, 80)
    with torch.no_grad():
        expected = model(input_features=features).logits
    torch.save({"features": features, "logits": expected}, tmp_path / "expected.pt")
    printed = run_without_mla_convert(
        f"""
        import numpy as np, torch
        from transformers import AutoModelForCTC, AutoProcessor, pipeline
        e = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCTC.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        with torch.no_grad():
            logits = model(input_features=e["features"]).logits
        assert torch.allclose(logits, e["logits"], atol=1e-5), (logits - e["logits"]).abs().max()
        asr = pipeline("automatic-speech-recognition", model={str(out)!r}, trust_remote_code=True)
        text = asr(np.random.default_rng(0).standard_normal(16000).astype("float32"))["text"]
        print(type(model).__name__, type(processor.feature_extractor).__name__, type(text).__name__)
        """,
        cwd=tmp_path,
    )
    assert printed.split() == ["ConformerForCTC", "ConformerFeatureExtractor", "str"]


def test_a_trained_branchformer_with_multi_head_attention_pushes(branchformer_mha, tmp_path):
    directory, model = branchformer_mha
    code, _ = _push(str(directory), "--repo-id", REPO, "--license", "mit", "--dry-run", str(tmp_path / "up"))
    assert code == 0
    card = (tmp_path / "up" / "README.md").read_text()
    meta = parse_front_matter(card)
    assert meta["pipeline_tag"] == "automatic-speech-recognition" and meta["license"] == "mit"
    assert meta["tags"] == ["mla-convert", "speech", "branchformer", "mha", "custom_code"]
    mha = attention_report(model.config)["kv_state_bytes_per_frame"]
    assert "a Branchformer CTC model (ESPnet layout) trained with `mla_convert`" in card
    assert "its self-attention multi-head attention (MHA)" in card
    assert f"K/V state: {mha} B per encoder frame (the full keys and values of multi-head attention)" in card
    assert "| cgMLP branch | 128 units, convolution kernel 15" in card
    assert "| branch merge | concatenation of both branches, then a linear layer |" in card
    assert "`mit`, given with `--license`" in card


# ------------------------------------------------------------------------------------------ training record


def _summary(datasets: list[str], utterances: int) -> dict:
    """A ``finetune_summary.json`` with the keys ``mla-convert train`` writes (finetuning/summary.py)."""
    return {
        "model": "/home/someone/runs/conf/initial",
        "output": "/home/someone/runs/conf",
        "datasets": datasets,
        "training_utterances": utterances,
        "steps": 120,
        "planned_steps": 200,
        "stopped_early": True,
        "epochs": 3.0,
        "learning_rate": 0.002,
        "batch_size": 8,
        "gradient_accumulation": 2,
        "train_loss": 2.5,
        "best_checkpoint": "checkpoint-100",
        "best_dev_wer": 0.4321,
        "device": "cpu (2 threads)",
        "precision": "fp32",
        "train_seconds": 12.5,
        "losses": [{"step": 110, "loss": 1.9}, {"step": 120, "loss": 1.75}],
        "train": {"recipe": "/home/someone/configs/conformer_mla.yaml", "family": "conformer", "seed": 42},
    }


def test_the_training_record_goes_into_the_card_without_local_paths(conformer_mla, tmp_path):
    from mla_convert.finetuning.config import SUMMARY_FILE, TRAINED_FILE

    assert (TRAINING_SUMMARY, TRAINING_RESULT) == (SUMMARY_FILE, TRAINED_FILE)
    directory = tmp_path / "run"
    shutil.copytree(conformer_mla[0], directory)
    summary = _summary(["/home/someone/data/LibriSpeech/train-clean-5", "hub:train-clean-100"], 40)
    (directory / TRAINING_SUMMARY).write_text(json.dumps(summary))
    card = plan_upload(directory, REPO, online=False).card
    assert "- **Recipe**: `conformer_mla.yaml` (`mla-convert train`, seed 42)" in card
    assert "- **Data**: a local folder `train-clean-5`, LibriSpeech train-clean-100 streamed from the Hub" in card
    assert "(40 training utterances)" in card
    assert "- **Steps**: 120 of 200 planned (stopped early), 3.0 epochs" in card
    assert "- **Final training loss**: 1.7500 (logged at step 120)" in card
    assert "- **Best dev WER**: 43.21% (step 100)" in card
    assert "trained on only 40 utterances" in card
    assert "/home/someone" not in card
    meta = parse_front_matter(card)
    assert meta["datasets"] == [HUB_DATASET] and meta["language"] == ["en"]

    (directory / TRAINING_SUMMARY).write_text(json.dumps(_summary(["/home/someone/data/LibriSpeech"], 28539)))
    card = plan_upload(directory, REPO, online=False).card
    assert "(28539 training utterances)" in card and "**Note**" not in card
    assert "datasets" not in parse_front_matter(card)  # a local folder is no Hub dataset


def test_without_a_summary_the_train_result_is_used(conformer_mla, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(conformer_mla[0], directory)
    result = {k: v for k, v in _summary([], 0).items() if k in ("steps", "train_loss", "best_dev_wer", "losses")}
    (directory / TRAINING_RESULT).write_text(json.dumps(result))
    card = plan_upload(directory, REPO, online=False).card
    assert "- **Steps**: 120" in card and "- **Best dev WER**: 43.21%" in card
    assert "an unrecorded amount of data" in card


def test_only_an_espnet_import_gives_a_base_model_and_never_a_path(conformer_mla, tmp_path):
    directory = tmp_path / "imported"
    shutil.copytree(conformer_mla[0], directory)
    (directory / "espnet_import.json").write_text(json.dumps({"hub_id": "espnet/simpleoier_librispeech_asr"}))
    card = plan_upload(directory, REPO, online=False).card
    assert parse_front_matter(card)["base_model"] == "espnet/simpleoier_librispeech_asr"
    assert "imported from ESPnet ([espnet/simpleoier_librispeech_asr]" in card

    (directory / "espnet_import.json").write_text(json.dumps({"source": str(tmp_path / "exp" / "model.pth")}))
    card = plan_upload(directory, REPO, online=False).card
    assert "base_model" not in parse_front_matter(card) and str(tmp_path) not in card
    assert "imported from ESPnet by `mla_convert`" in card


# ------------------------------------------------------------------------------------------ refusals and checks


def _one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()  # what the set-up printed (progress bars of save_pretrained)
    code, _ = _push(*argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_a_model_not_from_mla_convert_is_still_refused(conformer_mla, tmp_path, capsys):
    foreign = tmp_path / "wav2vec2"
    tiny_conformer("relative").save_pretrained(foreign)
    save_processor(foreign)
    err = _one_line_error(capsys, str(foreign), "--repo-id", REPO, "--dry-run", str(tmp_path / "a"))
    assert "is not a model converted by mla_convert" in err
    no_code = tmp_path / "no-auto-map"
    shutil.copytree(conformer_mla[0], no_code)
    config = json.loads((no_code / "config.json").read_text())
    del config["auto_map"]
    (no_code / "config.json").write_text(json.dumps(config))
    err = _one_line_error(capsys, str(no_code), "--repo-id", REPO, "--dry-run", str(tmp_path / "b"))
    assert "is not a model converted by mla_convert" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_integrity_checks_apply_to_trained_models(conformer_mla, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    shutil.copytree(conformer_mla[0], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    err = _one_line_error(capsys, str(truncated), "--repo-id", REPO, "--dry-run", str(tmp_path / "a"))
    assert f"{weights} is damaged" in err and "nothing was uploaded" in err

    missing = tmp_path / "missing"
    shutil.copytree(conformer_mla[0], missing)
    (missing / "attention_mla.py").unlink()
    err = _one_line_error(capsys, str(missing), "--repo-id", REPO, "--dry-run", str(tmp_path / "b"))
    assert "lacks attention_mla.py" in err

    needs_package = tmp_path / "needs-package"
    shutil.copytree(conformer_mla[0], needs_package)
    with (needs_package / "modeling_conformer.py").open("a") as handle:
        handle.write("import mla_convert\n")
    err = _one_line_error(capsys, str(needs_package), "--repo-id", REPO, "--dry-run", str(tmp_path / "c"))
    assert "(modeling_conformer.py): ImportError: No module named 'mla_convert'" in err
    assert not any((tmp_path / name).exists() for name in "abc")
