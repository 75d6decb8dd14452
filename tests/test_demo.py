"""`mla-convert demo`: plain vs. calibrated conversions of the bundled Whisper at equal cache sizes,
one calibration pass, arguments checked before any work, a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LIBRISPEECH, SHARED_DATA, needs_librispeech

from mla_convert import checkpoint, cli, demo
from mla_convert.report import ConversionReport
from mla_convert.specs import GQASpec, MLASpec, spec_to_dict

LJSPEECH = SHARED_DATA / "other" / "ljspeech"


@pytest.fixture
def bundled(imported_whisper, monkeypatch) -> Path:
    """The bundled Whisper tiny.en, imported once per session, found through the cache."""
    monkeypatch.setenv("MLA_CONVERT_CACHE", str(imported_whisper.parent))
    return imported_whisper


def _forbid_work(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("converted or evaluated before the arguments were checked")

    monkeypatch.setattr(demo.run, "convert_checkpoint", refuse)
    monkeypatch.setattr(demo.run, "evaluate_models", refuse)


@needs_librispeech
def test_default_rows_put_plain_and_calibrated_side_by_side_at_each_cache_size(bundled, tmp_path):
    plan = demo.plan_demo(data=str(LIBRISPEECH), output_dir=tmp_path / "r", checkpoints_dir=tmp_path / "c")
    names = [v.name for v in plan.variants]
    assert names == [
        "original",
        "mla-384",
        "mla-192", "mla-192-cal", "mla-budget-25-cal",
        "mla-96", "mla-96-cal", "mla-budget-12.5-cal",
        "mla-48", "mla-48-cal", "mla-budget-6.25-cal",
        "gqa-3-cal",
    ]  # fmt: skip
    by_name = {v.name: v for v in plan.variants}
    assert by_name["mla-384"].spec == MLASpec(latent_dim=384) and not by_name["mla-384"].calibration
    for d in (192, 96, 48):
        plain, calibrated, budget = (
            by_name[f"mla-{d}"],
            by_name[f"mla-{d}-cal"],
            by_name[f"mla-budget-{100 * d / 768:.3g}-cal"],
        )
        assert plain.spec == MLASpec(latent_dim=d) and not plain.calibration and plain.series == demo.PLAIN
        assert calibrated.spec == MLASpec(latent_dim=d, init="calibrated") and calibrated.series == demo.CALIBRATED
        # the same cache size: a uniform d_c of d spends d / (2 * 384) of the MHA K/V values
        assert budget.spec == MLASpec(cache_budget=d / 768, init="calibrated") and budget.series == demo.BUDGET
    assert by_name["gqa-3-cal"].spec == GQASpec(kv_heads=3, init="calibrated")
    # every calibrated row calibrates on the same sources (one pass): dev-clean + LJ Speech beside the root
    sources = {v.calibration for v in plan.variants if v.spec is not None and v.spec.init == "calibrated"}
    expected = (LIBRISPEECH / "dev-clean",) + ((LJSPEECH,) if LJSPEECH.is_dir() else ())
    assert {tuple(Path(s).resolve() for s in group) for group in sources} == {tuple(p.resolve() for p in expected)}
    assert plan.splits == ["test-clean", "test-other"] and plan.limit is None
    assert len(plan.conversions) == 11 and plan.evaluations == 24
    assert plan.checkpoint_bytes > 11 * 100e6  # ~150 MB per converted checkpoint
    described = plan.describe()
    assert "11 conversions (7 calibrated, sharing one calibration pass" in described and "MB written" in described
    assert "expected ~" in described and plan.estimated_seconds() < 30 * 60


@needs_librispeech
def test_quick_is_a_small_subset_and_explicit_options_still_apply(bundled, tmp_path):
    quick = demo.plan_demo(data=str(LIBRISPEECH), quick=True, output_dir=tmp_path / "r", checkpoints_dir=tmp_path / "c")
    assert quick.splits == ["test-clean"] and quick.limit == demo.QUICK_LIMIT
    assert [v.name for v in quick.variants] == ["original", "mla-96", "mla-96-cal", "mla-budget-12.5-cal", "gqa-3-cal"]
    assert quick.utterances == {"test-clean": demo.QUICK_LIMIT} and quick.estimated_seconds() < 6 * 60
    chosen = demo.plan_demo(data=str(LIBRISPEECH), quick=True, limit=3, splits=["test-other"], latent_dims=[48],
                            kv_heads=None, output_dir=tmp_path / "r", checkpoints_dir=tmp_path / "c")  # fmt: skip
    assert chosen.limit == 3 and chosen.splits == ["test-other"]
    assert [v.name for v in chosen.variants] == ["original", "mla-48", "mla-48-cal", "mla-budget-6.25-cal"]
    plain = demo.plan_demo(data=str(LIBRISPEECH), plain_only=True, latent_dims=[48, 384],
                           output_dir=tmp_path / "r", checkpoints_dir=tmp_path / "c")  # fmt: skip
    assert [v.name for v in plain.variants] == ["original", "mla-384", "mla-48"] and plain.calibration == ()


@needs_librispeech
def test_evaluating_dev_clean_leaves_it_out_of_the_calibration(bundled, tmp_path):
    plan = demo.plan_demo(data=str(LIBRISPEECH), splits=["dev-clean"], latent_dims=[96],
                          output_dir=tmp_path / "r", checkpoints_dir=tmp_path / "c")  # fmt: skip
    if LJSPEECH.is_dir():
        assert [Path(s).resolve() for s in plan.calibration] == [LJSPEECH.resolve()]
        assert any("dev-clean is evaluated" in note for note in plan.notes)
    else:
        pytest.skip("no other/ljspeech beside the LibriSpeech sample")


@needs_librispeech
def test_bad_arguments_are_one_line_errors_before_any_conversion(bundled, tmp_path, monkeypatch, capsys):
    _forbid_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    empty_root = tmp_path / "root"
    (empty_root / "test-clean").mkdir(parents=True)
    base = ["demo", "--data", str(LIBRISPEECH), "--quiet"]
    cases = [
        ([*base, "--limit", "0"], "--limit must be at least 1"),
        ([*base, "--batch-size", "0"], "--batch-size must be at least 1"),
        ([*base, "--split", "test-cleen"], "unknown split 'test-cleen'"),
        ([*base, "--split", "train-clean-100"], "no train-clean-100 folder"),
        (["demo", "--data", str(tmp_path / "missing"), "--quiet"], "does not exist"),
        (["demo", "--data", "hub", "--quiet"], "HF_HUB_OFFLINE"),
        (["demo", "--data", str(empty_root), "--split", "test-clean", "--quiet"], "no utterances"),
        ([*base, "--output-dir", str(afile)], "a-file"),
        ([*base, "--checkpoints-dir", str(afile / "below")], "a-file"),
        ([*base, "--latent-dims", "999"], "latent_dim must be in 1..384"),
        ([*base, "--kv-heads", "4"], "kv_heads must divide"),
        ([*base, "--calibration-samples", "0"], "--calibration-samples must be at least 1"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("mla-convert: error:") and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results").exists()


def _fake_evaluation(calls: list):
    def evaluate(models, splits, **kwargs):
        calls.append(list(models))
        results = [
            {"model": model, "split": split, "wer": 0.1 + 0.01 * index, "cer": 0.05, "utterances": kwargs["limit"],
             "substitutions": 1, "deletions": 0, "insertions": 0, "reference_words": 10,
             "generation_limit_hits": 0, "wall_seconds": 1.0}
            for index, model in enumerate(models)
            for split in splits
        ]  # fmt: skip
        path = Path(kwargs["results_dir"]) / "eval-fake.json"
        return {"results": results}, path

    return evaluate


@needs_librispeech
def test_every_calibrated_row_reuses_one_calibration_pass(bundled, tmp_path, monkeypatch):
    """The calibration audio is read and decoded once for the calibrated MLA, budget and GQA rows (the
    fitting itself is stubbed: its maths is tested in test_calibrated.py)."""
    monkeypatch.setattr(checkpoint, "_CALIBRATION_CACHE", {})
    gathered, fitted = [], []
    real = checkpoint.calibration_utterances

    def counting(*args, **kwargs):
        gathered.append(args)
        return real(*args, **kwargs)

    def fake_convert(model, spec, *, layers=None, targets=None, calibration=None, held_out=None, progress=False):
        fitted.append((spec, None if calibration is None else id(calibration)))
        return ConversionReport(model_type="whisper", spec=spec_to_dict(spec), dtype="float32")

    monkeypatch.setattr(checkpoint, "calibration_utterances", counting)
    monkeypatch.setattr(checkpoint, "convert", fake_convert)
    evaluations: list = []
    monkeypatch.setattr(demo.run, "evaluate_models", _fake_evaluation(evaluations))
    plan = demo.plan_demo(data=str(LIBRISPEECH), splits=["test-clean"], limit=2, latent_dims=[48],
                          calibration_samples=5, output_dir=tmp_path / "r", checkpoints_dir=tmp_path / "c")  # fmt: skip
    announced: list[str] = []
    rows, journal, notes, seconds = demo.run_demo(plan, progress=False, announce=announced.append)
    assert len(gathered) == 1, "one calibration pass for the calibrated MLA, budget and GQA rows"
    assert [spec for spec, _ in fitted] == [v.spec for v in plan.conversions]
    calibrated_batches = {batches for _, batches in fitted if batches is not None}
    assert len(calibrated_batches) == 1 and len([b for _, b in fitted if b is not None]) == 3, "the same batches"
    assert len(evaluations) == 1 and len(evaluations[0]) == 5, "all models in one evaluation run"
    assert [row["variant"] for row in rows] == ["original", "mla-48", "mla-48-cal", "mla-budget-6.25-cal", "gqa-3-cal"]
    assert [row["series"] for row in rows] == [demo.ORIGINAL, demo.PLAIN, demo.CALIBRATED, demo.BUDGET,
                                               demo.GQA_CALIBRATED]  # fmt: skip
    calibrated = rows[2]["calibration"]
    assert calibrated["fit_utterances"] + calibrated["held_out_utterances"] == 5
    assert "Calibration audio:" in notes and "5 utterances" in notes and "share no utterance" in notes
    assert any(line.startswith("[2/4] converting mla-48-cal (first calibrated row") for line in announced)
    assert announced[-1].startswith("evaluating 5 models on test-clean (first 2 each)")
    paths = demo.write_report(rows, plan.splits, tmp_path / "r", "demo", demo.DEMO_TITLE, notes, "convert_seconds")
    table = paths[0].read_text()
    assert "| variant | decoder K/V cache B/token | convert s | test-clean WER %" in table
    assert paths[1].stat().st_size > 10_000


@needs_librispeech
def test_demo_runs_end_to_end_and_lossless_mla_matches_the_original(bundled, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--data", str(LIBRISPEECH), "--split", "test-clean", "--limit", "2",
            "--latent-dims", "384", "48", "--plain-only", "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "| mla-384" in captured.out and "| mla-48" in captured.out
    assert "3 rows" in captured.err and "expected ~" in captured.err and "demo finished in" in captured.err
    rows = json.loads((tmp_path / "results" / "demo.json").read_text())
    assert [row["variant"] for row in rows] == ["original", "mla-384", "mla-48"]
    assert [row["decoder_cache_bytes_per_token"] for row in rows] == [12288, 6144, 768]
    original, lossless, small = (row["splits"]["test-clean"] for row in rows)
    assert original["utterances"] == lossless["utterances"] == small["utterances"] == 2
    assert lossless["wer"] == original["wer"] < 0.2
    assert (tmp_path / "results" / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "results" / "demo.md").read_text().startswith("# mla-convert demo")
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "demo").iterdir()) == [
        "whisper-tiny.en-mla-384",
        "whisper-tiny.en-mla-48",
    ]
