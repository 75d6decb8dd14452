"""`mla-convert demo`: the bundled Whisper converted at several latent sizes, evaluated, tabled, plotted."""

from __future__ import annotations

import json

from conftest import LIBRISPEECH

from mla_convert import cli


def test_demo_writes_a_table_a_plot_and_rows_where_lossless_mla_matches_the_original(
    tmp_path, monkeypatch, imported_whisper, capsys
):
    monkeypatch.setenv("MLA_CONVERT_CACHE", str(imported_whisper.parent))
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--data", str(LIBRISPEECH), "--split", "dev-clean", "--limit", "3",
            "--latent-dims", "384", "48", "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| mla-384" in printed and "| mla-48" in printed
    rows = json.loads((tmp_path / "results" / "demo.json").read_text())
    assert [row["variant"] for row in rows] == ["original", "mla-384", "mla-48"]
    assert [row["decoder_cache_bytes_per_token"] for row in rows] == [12288, 6144, 768]
    original, lossless, small = (row["splits"]["dev-clean"] for row in rows)
    assert original["utterances"] == lossless["utterances"] == small["utterances"] == 3
    assert lossless["wer"] == original["wer"] < 0.2
    assert (tmp_path / "results" / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "results" / "demo.md").read_text().startswith("# mla-convert demo")
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "demo").iterdir()) == [
        "whisper-tiny.en-mla-384",
        "whisper-tiny.en-mla-48",
    ]
