"""``mla-convert convert``: one command in, a loadable model out; bad input is one line, no files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mla_convert import cli, load


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mla_convert", *args], capture_output=True, text=True, timeout=300)


def test_convert_writes_model_processor_and_report(saved_conformer, tmp_path, capsys):
    output = tmp_path / "mla"
    code = cli.main(
        ["convert", str(saved_conformer), "--attention", "mla", "--latent-dim", "16", "--output", str(output)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "encoder.layers.0.self_attn" in printed and "K/V state per frame" in printed
    report = json.loads((output / "conversion_report.json").read_text())
    assert report["totals"]["state_bytes_per_frame_after"] == 2 * 16 * 4
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(output)).__name__ == "Wav2Vec2Processor"
    assert load(output).config.attention_conversion["spec"]["latent_dim"] == 16
    assert [p.name for p in tmp_path.iterdir()] == ["mla"]


def test_existing_output_needs_overwrite(saved_conformer, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    args = ["convert", str(saved_conformer), "--attention", "gqa", "--kv-heads", "2", "--output", str(output)]
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "mine"
    assert cli.main([*args, "--overwrite"]) == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attention", "mla", "--latent-dim", "0"], "latent_dim must be in 1..64"),
        (["--attention", "mla", "--latent-dim", "65"], "latent_dim must be in 1..64"),
        (["--attention", "mla", "--latent-dim", "129", "--init", "svd-split"], "latent_dim must be in 1..128"),
        (["--attention", "gqa", "--kv-heads", "3"], "kv_heads must divide the 4 attention heads"),
        (["--attention", "mla"], "needs --latent-dim"),
        (["--attention", "mla", "--latent-dim", "8", "--layers", "7"], "no attention layer(s) [7]"),
        (["--attention", "mla", "--cache-budget", "0.001"], "every layer needs at least one"),
        (["--attention", "mla", "--cache-budget", "0.7"], "cache_budget is a fraction"),
        (["--attention", "mla", "--latent-dim", "8", "--damping", "-1"], "damping must be >= 0"),
        (["--attention", "linear", "--feature-map", "hedgehog"], "--feature-map hedgehog needs calibration audio"),
        (
            ["--attention", "mla", "--latent-dim", "8", "--calibration", "hub", "--calibration-samples", "0"],
            "--calibration-samples must be at least 1",
        ),
    ],
)
def test_bad_specs_fail_in_one_line_and_write_nothing(saved_conformer, tmp_path, extra, message):
    result = run_cli("convert", str(saved_conformer), *extra, "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/no/such/model/dir", "no such model directory"),
        ("nobody-here/no-such-model", "not in the Hugging Face cache"),
    ],
)
def test_missing_models_fail_in_one_line_offline(tmp_path, model, message):
    result = run_cli("convert", model, "--attention", "mla", "--latent-dim", "8", "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_convertible_attention_is_refused(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=8,
        conv_dim=(16,),
        conv_stride=(5,),
        conv_kernel=(10,),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2ForCTC(config).save_pretrained(tmp_path / "wav2vec2")
    result = run_cli(
        "convert",
        str(tmp_path / "wav2vec2"),
        "--attention",
        "mla",
        "--latent-dim",
        "8",
        "--output",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2 and "no attention this tool can convert" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failure_while_saving_leaves_nothing_behind(saved_conformer, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def broken_save(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    code = cli.main(["convert", str(saved_conformer), "--attention", "linear", "--output", str(tmp_path / "out")])
    assert code == 130
    assert list(tmp_path.iterdir()) == []


def test_converting_a_converted_model_is_refused(saved_conformer, tmp_path):
    first = tmp_path / "first"
    assert (
        cli.main(["convert", str(saved_conformer), "--attention", "mla", "--latent-dim", "8", "--output", str(first)])
        == 0
    )
    result = run_cli("convert", str(first), "--attention", "mla", "--latent-dim", "4", "--output", str(tmp_path / "b"))
    assert result.returncode == 2 and "already converted" in result.stderr


def test_processor_files_are_optional(tmp_path, capsys):
    from conftest import tiny_conformer

    tiny_conformer().save_pretrained(tmp_path / "bare")
    assert (
        cli.main(
            [
                "convert",
                str(tmp_path / "bare"),
                "--attention",
                "mla",
                "--latent-dim",
                "8",
                "--output",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / "config.json").is_file()
