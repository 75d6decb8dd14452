"""``mla-convert finetune``: Trainer fine-tuning with distillation, exact resume, clear failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import LIBRISPEECH, SHARED_DATA, save_processor, tiny_conformer

import mla_convert
from mla_convert import cli
from mla_convert.finetuning import (
    FinetuneConfig,
    SpeechCollator,
    distillation_loss,
    finetune,
    label_text,
    last_complete_checkpoint,
    mean_training_loss,
    parse_test_splits,
)
from mla_convert.specs import MLASpec

DEV_CLEAN = LIBRISPEECH / "dev-clean"
# no dropout / SpecAugment: a student equal to its teacher gives exactly the teacher's logits
NO_NOISE = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)  # fmt: skip
# a 160x feature-encoder stride (real checkpoints: 320x) keeps attention over 4 s of audio small
STRIDE = dict(conv_dim=(32, 32, 32), conv_stride=(5, 4, 8), conv_kernel=(10, 4, 8))


def saved_ctc(directory: Path, seed: int = 0, convert: bool = True) -> Path:
    model = tiny_conformer("relative", seed=seed, **STRIDE, **NO_NOISE)
    if convert:
        mla_convert.convert(model, MLASpec(latent_dim=16))
    model.save_pretrained(directory)
    save_processor(directory)
    return directory


@pytest.fixture(scope="module")
def ctc_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(converted student, original teacher): a tiny conformer and its MLA conversion, saved."""
    root = tmp_path_factory.mktemp("ctc")
    return saved_ctc(root / "student"), saved_ctc(root / "teacher", convert=False)


def ctc_config(student: Path, output: Path, **overrides) -> FinetuneConfig:
    values = dict(
        model=str(student),
        output=str(output),
        data=[str(DEV_CLEAN)],
        max_seconds=4.0,
        max_steps=6,
        batch_size=2,
        grad_accum=1,
        lr=1e-3,
        warmup_steps=0,
        eval_data="none",
        eval_steps=2,
        logging_steps=1,
        test_splits=[],
        progress=False,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def losses(summary: dict, key: str = "loss") -> list[float]:
    return [entry[key] for entry in summary["losses"] if key in entry]


def test_ctc_fine_tune_lowers_the_loss_and_writes_a_loadable_model(ctc_pair, tmp_path):
    student, teacher = ctc_pair
    # the 4 dev-clean utterances under 4 s in one batch: every step's loss is over the same audio
    config = ctc_config(student, tmp_path / "run", teacher=str(teacher), max_seconds=4.0, batch_size=4, max_steps=10)
    summary = finetune(config)
    curve = losses(summary)
    assert summary["steps"] == 10 and summary["samples_seen"] == 40 and summary["training_utterances"] == 4
    assert curve[-1] < 0.9 * curve[0]
    assert summary["precision"] == "fp32" and summary["device"].startswith("cpu")
    model = mla_convert.load(tmp_path / "run")
    assert model.config.attention_conversion["spec"]["latent_dim"] == 16
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(tmp_path / "run")).__name__ == "Wav2Vec2Processor"
    assert list((tmp_path / "run" / "runs").glob("events.out.tfevents.*")), "TensorBoard logs"


def test_whisper_fine_tune_lowers_the_loss(tiny_seq2seq_student, tmp_path):
    student, teacher = tiny_seq2seq_student
    config = ctc_config(student, tmp_path / "run", teacher=str(teacher), max_seconds=None, lr=3e-3, max_steps=8)
    summary = finetune(config)
    task = losses(summary, "task_loss")
    assert len(task) == 8 and sum(task[-3:]) / 3 < sum(task[:3]) / 3
    assert summary["shared_encoder"] is False  # --freeze feature-encoder leaves the encoder trainable


def test_distillation_loss_is_zero_when_student_equals_teacher(tiny_seq2seq_student, tmp_path):
    logits = torch.randn(2, 7, 11)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    assert distillation_loss(logits, logits.clone(), mask, temperature=2.0).item() == 0.0
    assert distillation_loss(logits, torch.randn(2, 7, 11), mask).item() > 0.0
    # the unconverted Whisper distilled from itself: the first step's KL is exactly 0 (a model with
    # batch norm, like the conformer, would differ: the student trains in batch-statistics mode)
    _, teacher = tiny_seq2seq_student
    config = ctc_config(teacher, tmp_path / "run", teacher=str(teacher), max_seconds=None, max_steps=1)
    summary = finetune(config)
    assert summary["losses"][0]["distill_loss"] == 0.0 and summary["losses"][0]["task_loss"] > 0


KILL_AFTER_SAVE = """
import os, signal, sys
from transformers import TrainerCallback
from mla_convert.finetuning import FinetuneConfig, finetune

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)

finetune(FinetuneConfig(**{config}), callbacks=[KillAfterSave()])
"""


def test_resume_after_a_kill_matches_an_uninterrupted_run(ctc_pair, tmp_path):
    student, teacher = ctc_pair
    # logs at steps 1 and 4 only: steps 5-6 reach the mean training loss through Trainer's train_loss
    settings = dict(teacher=str(teacher), save_total_limit=None, logging_steps=4)
    straight = finetune(ctc_config(student, tmp_path / "straight", **settings))
    config = ctc_config(student, tmp_path / "killed", **settings)
    script = KILL_AFTER_SAVE.format(step=4, config=repr(config.to_dict()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, timeout=600)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert last_complete_checkpoint(tmp_path / "killed" / "checkpoints").name == "checkpoint-4"
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    config.resume = True
    resumed = finetune(config)
    assert resumed["steps"] == straight["steps"] == 6
    assert resumed["samples_seen"] == straight["samples_seen"] == 12
    # the mean loss of the resumed run covers all 6 steps, not only the 2 trained after the resume
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    assert [e["step"] for e in resumed["losses"]] == [e["step"] for e in straight["losses"]] == [1, 4]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_mean_training_loss_weighs_each_log_by_its_steps_and_adds_the_unlogged_tail():
    history = [{"step": 1, "loss": 4.0}, {"step": 4, "loss": 2.0}, {"step": 4, "eval_wer": 0.5},
               {"step": 6, "train_loss": 9.9}]  # fmt: skip
    # steps 1 | 2-4 | 5-6: Trainer's train_loss of an uninterrupted run is the mean of all 6 (here 2.5)
    assert mean_training_loss(history, 6, 0, 2.5) == pytest.approx(2.5)
    # resumed from checkpoint-4 with steps 5-6 at 1.0 (what Trainer reports as train_loss then)
    assert mean_training_loss(history, 6, 4, 1.0) == pytest.approx((4.0 + 3 * 2.0 + 2 * 1.0) / 6)
    # resumed from checkpoint-4 and logged at 5 and 6: the logs are enough
    resumed = [*history[:2], {"step": 5, "loss": 1.0}, {"step": 6, "loss": 3.0}]
    assert mean_training_loss(resumed, 6, 4, 2.0) == pytest.approx((4.0 + 3 * 2.0 + 1.0 + 3.0) / 6)
    assert mean_training_loss([], 0) is None


def test_test_splits_none_skips_the_final_evaluation(ctc_pair, tmp_path, capsys):
    student, _ = ctc_pair
    assert parse_test_splits(["none"]) == parse_test_splits(["None"]) == parse_test_splits([]) == []
    assert parse_test_splits(["test-clean"]) == ["test-clean"]
    with pytest.raises(mla_convert.MlaConvertError, match="give it alone"):
        parse_test_splits(["none", "test-clean"])
    output = tmp_path / "run"
    args = ["finetune", str(student), "--data", str(DEV_CLEAN), "--max-seconds", "4.0", "--max-steps", "1",
            "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "0", "--eval-data", "none",
            "--test-splits", "none", "--output", str(output), "--quiet"]  # fmt: skip
    assert cli.main([*args[:2], "--check-data", *args[2:]]) == 0
    checked = capsys.readouterr().out
    assert checked.startswith("data ok:") and "no final evaluation" in checked and not output.exists()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "mean training loss" in printed
    summary = json.loads((output / "finetune_summary.json").read_text())
    assert summary["wer"] == {} and summary["steps"] == 1 and summary["train_loss"] > 0
    assert not (output / "evaluation.json").exists()


def test_a_diverging_learning_rate_stops_with_one_line_and_keeps_the_last_good_checkpoint(ctc_pair, tmp_path, capsys):
    student, _ = ctc_pair
    output = tmp_path / "run"
    args = ["finetune", str(student), "--data", str(DEV_CLEAN), "--max-seconds", "4.0", "--max-steps", "30",
            "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "0", "--eval-data", "none",
            "--eval-steps", "1", "--test-splits", "--lr", "1e4", "--output", str(output), "--quiet"]  # fmt: skip
    assert cli.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "training loss became nan" in error and "learning rate 10000.0" in error
    good = last_complete_checkpoint(output / "checkpoints")
    assert good is not None and f"last good checkpoint: {good}" in error
    from safetensors.torch import load_file

    weights = load_file(good / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (output / "model.safetensors").exists()


def test_bad_input_is_one_line(ctc_pair, tmp_path, capsys):
    student, teacher = ctc_pair
    other_vocab = tmp_path / "other"
    model = tiny_conformer("relative", vocab_size=40, **STRIDE)
    model.save_pretrained(other_vocab)
    save_processor(other_vocab)
    capsys.readouterr()
    base = ["finetune", str(student), "--max-steps", "1", "--quiet", "--test-splits"]
    cases = [
        ([*base, "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "a")], "does not exist"),
        ([*base, "--data", str(LIBRISPEECH), "--output", str(tmp_path / "f")],
         "no train-clean-100 folder under"),
        ([*base, "--data", str(DEV_CLEAN), "--teacher", str(other_vocab), "--output", str(tmp_path / "b")],
         "different vocabulary (40 output tokens against the student's 32)"),
        ([*base, "--data", str(DEV_CLEAN), "--distill-only", "--output", str(tmp_path / "c")], "needs --teacher"),
        ([*base, "--data", str(DEV_CLEAN), "--output", str(student)], "pass --resume"),
        ([*base, "--data", str(DEV_CLEAN), "--resume", "--output", str(tmp_path / "d")], "does not exist"),
        ([*base, "--data", str(DEV_CLEAN), "--lr", "0", "--output", str(tmp_path / "e")], "--lr must be a positive"),
        ([*base[:-1], "--test-splits", "test-cleen", "--data", str(DEV_CLEAN), "--output", str(tmp_path / "g")],
         "unknown split 'test-cleen'"),
        ([*base[:-1], "--test-splits", "test-clean", "--data", str(DEV_CLEAN), "--test-data", str(tmp_path),
          "--output", str(tmp_path / "h")], "no test-clean folder under"),
        ([*base, "--data", str(LIBRISPEECH), "--check-data", "--output", str(tmp_path / "i")],
         "no train-clean-100 folder under"),
    ]  # fmt: skip
    for args, message in cases:
        assert cli.main(args) == 2, args
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_training_never_uses_the_test_utterances(ctc_pair, tmp_path):
    student, _ = ctc_pair
    test_clean = LIBRISPEECH / "test-clean"
    config = ctc_config(student, tmp_path / "run", data=[str(test_clean)], test_splits=["test-clean"],
                        test_data=str(LIBRISPEECH))  # fmt: skip
    with pytest.raises(mla_convert.MlaConvertError, match="shares .* utterances with test-clean"):
        finetune(config)


def test_end_of_run_evaluation_writes_before_after_wer(ctc_pair, tmp_path):
    student, teacher = ctc_pair
    config = ctc_config(student, tmp_path / "run", teacher=str(teacher), max_steps=2, eval_data=None,
                        max_seconds=4.5, test_splits=["test-clean"], test_data=str(LIBRISPEECH),
                        test_limit=2)  # fmt: skip
    summary = finetune(config)
    row = summary["wer"]["test-clean"]
    assert set(row) >= {"before", "after", "teacher"}
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert {r["model"] for r in evaluation["results"]} == {str(student), str(tmp_path / "run"), str(teacher)}
    on_disk = json.loads((tmp_path / "run" / "finetune_summary.json").read_text())
    assert on_disk["wer"] == summary["wer"] and on_disk["best_checkpoint"] is not None
    # the fifth utterance is held out for model selection (a folder of one subset: no dev-clean beside it)
    assert on_disk["training_utterances"] == 4 and len(on_disk["dev_history"]) == 1


def test_labels_follow_the_model_writing_style():
    class Letters:
        do_lower_case = False

        def get_vocab(self):
            return {c: i for i, c in enumerate("ABC|")}

    assert label_text("he said", Letters(), "ctc") == "HE SAID"
    assert label_text("HE SAID SO", None, "seq2seq") == "He said so"
    assert label_text("Mixed Case.", None, "seq2seq") == "Mixed Case."


def test_seq2seq_targets_are_the_decoder_inputs_shifted_left():
    collator = SpeechCollator(kind="seq2seq", feature_extractor=None, tokenizer=None, decoder_start_token_id=9,
                              pad_token_id=0)  # fmt: skip
    batch = collator.teacher_forcing([[9, 5, 6, 7, 2], [9, 5, 2]])
    assert batch["labels"].tolist() == [[5, 6, 7, 2], [5, 2, -100, -100]]
    assert batch["decoder_input_ids"].tolist() == [[9, 5, 6, 7], [9, 5, 0, 0]]


@pytest.fixture(scope="module")
def tiny_seq2seq_student(imported_whisper, tmp_path_factory) -> tuple[Path, Path]:
    """A 2+2-layer random Whisper with the real tiny.en tokenizer and generation settings, and its MLA
    conversion (decoder self-attention), each saved with the processor."""
    from transformers import AutoProcessor, GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    real = WhisperConfig.from_pretrained(imported_whisper)
    config = WhisperConfig(
        vocab_size=real.vocab_size, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=real.num_mel_bins,
        max_source_positions=real.max_source_positions, max_target_positions=real.max_target_positions,
        decoder_start_token_id=real.decoder_start_token_id, eos_token_id=real.eos_token_id,
        pad_token_id=real.pad_token_id, bos_token_id=real.bos_token_id, suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip
    root = tmp_path_factory.mktemp("seq2seq")
    processor = AutoProcessor.from_pretrained(imported_whisper)
    generation = GenerationConfig.from_pretrained(imported_whisper)
    generation.max_length = 16
    paths = []
    for name, convert in (("student", True), ("teacher", False)):
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config)
        model.generation_config = generation
        if convert:
            mla_convert.convert(model, MLASpec(latent_dim=16), targets=["decoder"])
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]


def test_unreachable_data_or_hub_fails_before_training(ctc_pair, tmp_path, capsys, monkeypatch):
    student, _ = ctc_pair
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LIBRISPEECH_ROOT", raising=False)
    base = ["finetune", str(student), "--max-steps", "1", "--quiet"]
    cases = [
        ([*base, "--data", "hub", "--test-splits", "--output", str(tmp_path / "a")], "HF_HUB_OFFLINE"),
        ([*base, "--data", str(DEV_CLEAN), "--output", str(tmp_path / "b")], "HF_HUB_OFFLINE"),  # test data: Hub
        ([*base, "--data", str(DEV_CLEAN), "--test-splits", "--push-to-hub", "someone/model",
          "--output", str(tmp_path / "c")], "HF_HUB_OFFLINE"),
    ]  # fmt: skip
    for args, message in cases:
        assert cli.main(args) == 2, args
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error
    assert list(tmp_path.iterdir()) == []


def test_a_fine_tuned_model_pushes_with_its_training_in_the_card(ctc_pair, tmp_path):
    student, teacher = ctc_pair
    run = tmp_path / "run"
    config = ctc_config(student, run, teacher=str(teacher), max_steps=2, test_splits=["test-clean"],
                        test_data=str(LIBRISPEECH), test_limit=1)  # fmt: skip
    finetune(config)
    upload = tmp_path / "upload"
    assert cli.main(["push", str(run), "--repo-id", "someone/tiny-mla-ft", "--dry-run", str(upload)]) == 0
    card = (upload / "README.md").read_text()
    assert "## Fine-tuning" in card and "- **Steps**: 2" in card and str(DEV_CLEAN) in card
    assert "model-index" in card  # the fine-tuned model's rows of evaluation.json
    assert not (upload / "checkpoints").exists() and not (upload / "runs").exists()
    assert (upload / "model.safetensors").is_file() and (upload / "modeling_converted_wav2vec2_conformer.py").is_file()


def test_recipe_script_converts_fine_tunes_evaluates_and_writes_the_table(ctc_pair, tmp_path):
    _, teacher = ctc_pair
    recipe = {
        "description": "tiny end-to-end check",
        "model": str(teacher),
        "convert": {"attention": "mla", "latent-dim": 16},
        "finetune": {"data": ["${SHARED_DATA}/LibriSpeech/dev-clean"], "test-data": "${SHARED_DATA}/LibriSpeech",
                     "test-splits": ["test-clean"], "test-limit": 1, "max-seconds": 4.5, "max-steps": 2,
                     "batch-size": 2, "grad-accum": 1, "warmup-steps": 0, "eval-steps": 1, "quiet": True},
    }  # fmt: skip
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(recipe))
    (tmp_path / "empty").mkdir()
    script = Path(__file__).resolve().parents[1] / "run_mla_finetuning.sh"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SHARED_DATA": str(SHARED_DATA)}
    done = subprocess.run(["bash", str(script), str(config)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "results" / f"finetune-tiny-{teacher.name}.md").read_text()
    assert "| original: original (MHA) |" in table and "| converted+FT: converted + fine-tuned |" in table
    assert (tmp_path / "runs" / f"tiny-{teacher.name}" / "finetuned" / "finetune_summary.json").is_file()
    # a recipe whose training split is missing fails before converting anything
    quick = subprocess.run(["bash", str(script), "quick"], cwd=tmp_path / "empty", capture_output=True, text=True,
                           env={**env, "LIBRISPEECH_ROOT": str(LIBRISPEECH)}, timeout=300)  # fmt: skip
    assert quick.returncode == 2 and "no train-clean-100 folder under" in quick.stderr, quick.stderr[-2000:]
    assert not (tmp_path / "empty" / "runs").exists()
    again = subprocess.run(["bash", str(script), "nonsense"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "no recipe" in again.stderr
