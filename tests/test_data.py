"""The LibriSpeech pipeline (``mla_convert.data``): one streaming ``IterableDataset`` for both sources.

Local runs read the real utterances in ``../shared/data/LibriSpeech`` (official tarball layout) and
audio files made here with soundfile; the Hub source is exercised offline by standing in for
``datasets.load_dataset`` with a stream shaped like ``openslr/librispeech_asr``.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import soundfile
from conftest import LIBRISPEECH, SHARED_DATA

from mla_convert import data
from mla_convert.data import (
    SPLITS,
    AudioDecodeError,
    DataError,
    UnknownSplitError,
    check_local_split,
    decode_audio,
    librispeech,
    resolve_source,
    split_ids,
)
from mla_convert.errors import MlaConvertError

needs_shared = pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason="shared LibriSpeech sample not present")


def transcripts(subset_dir) -> dict[str, str]:
    rows = {}
    for file in subset_dir.glob("*/*/*.trans.txt"):
        for line in file.read_text().splitlines():
            utterance_id, text = line.split(" ", 1)
            rows[utterance_id] = text
    return rows


def sine(seconds: float, rate: int, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def make_root(tmp_path, files: dict[str, np.ndarray | bytes | None], rates: dict[str, int] | None = None):
    """A LibriSpeech root with one chapter (``dev-clean/1/2``); ``None`` lists an utterance with no file."""
    chapter = tmp_path / "root" / "dev-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    lines = []
    for index, (name, content) in enumerate(files.items()):
        utterance_id = f"1-2-{index:04d}"
        lines.append(f"{utterance_id} {name.upper()} WORDS")
        if isinstance(content, bytes):
            (chapter / f"{utterance_id}.flac").write_bytes(content)
        elif content is not None:
            soundfile.write(chapter / f"{utterance_id}.flac", content, (rates or {}).get(name, 16000))
    (chapter / "1-2.trans.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "root"


@needs_shared
def test_a_local_root_streams_decoded_rows_through_an_iterable_dataset():
    from datasets import IterableDataset

    dataset = librispeech("dev-clean", LIBRISPEECH)
    assert isinstance(dataset, IterableDataset)
    rows = list(dataset)
    expected = transcripts(LIBRISPEECH / "dev-clean")
    assert len(rows) == len(expected) == 13
    for row in rows:
        assert set(row) == {"id", "split", "text", "audio", "duration"}
        assert row["split"] == "dev-clean"
        assert row["text"] == expected[row["id"]]
        assert row["audio"].dtype == np.float32 and row["audio"].ndim == 1
        assert row["duration"] == pytest.approx(len(row["audio"]) / 16000)
    assert sum(row["duration"] for row in rows) == pytest.approx(80.6, abs=0.1)


@needs_shared
def test_the_order_is_fixed_and_limit_then_exclude_ids_pick_utterances_before_decoding():
    everything = [row["id"] for row in librispeech("test-clean", LIBRISPEECH)]
    assert everything == [row["id"] for row in librispeech("test-clean", LIBRISPEECH)]
    first_five = everything[:5]
    rest = [row["id"] for row in librispeech("test-clean", LIBRISPEECH, limit=5, exclude_ids=first_five[:2])]
    assert rest == first_five[2:]


@needs_shared
def test_the_tarballs_top_folder_is_accepted_as_root():
    rows = list(librispeech("dev-clean", SHARED_DATA, limit=1))
    assert len(rows) == 1


def test_audio_at_8k_44k_and_stereo_comes_out_mono_at_the_requested_rate(tmp_path):
    stereo = np.stack([sine(1.0, 44100), 0.5 * sine(1.0, 44100)], axis=1)
    root = make_root(
        tmp_path,
        {"narrow": sine(2.0, 8000), "stereo": stereo, "native": sine(0.5, 16000)},
        rates={"narrow": 8000, "stereo": 44100},
    )
    rows = {row["text"].split()[0]: row for row in librispeech("dev-clean", root)}
    assert rows["NARROW"]["audio"].shape == (32000,)
    assert rows["STEREO"]["audio"].shape == (16000,)
    assert rows["NATIVE"]["audio"].shape == (8000,)
    # the downmix is the channel mean: amplitude 0.5 * (1 + 0.5) / 2
    assert np.abs(rows["STEREO"]["audio"][1000:-1000]).max() == pytest.approx(0.375, abs=0.01)
    # resampling keeps the pitch: the spectrum peaks at 440 Hz
    spectrum = np.abs(np.fft.rfft(rows["NARROW"]["audio"]))
    assert np.argmax(spectrum) * 16000 / len(rows["NARROW"]["audio"]) == pytest.approx(440, abs=2)
    assert rows["NARROW"]["audio"].dtype == np.float32


def test_corrupt_and_missing_audio_is_skipped_with_a_warning_or_kept_as_an_error_row(tmp_path, caplog):
    root = make_root(tmp_path, {"good": sine(1.0, 16000), "corrupt": b"fLaC but not really", "missing": None})
    with caplog.at_level(logging.WARNING, logger="mla_convert.data"):
        rows = list(librispeech("dev-clean", root))
    assert [row["text"] for row in rows] == ["GOOD WORDS"]
    assert sum("skipping unreadable audio" in record.message for record in caplog.records) == 2

    kept = list(librispeech("dev-clean", root, keep_unreadable=True))
    assert [row["error"] is None for row in kept] == [True, False, False]
    assert all(row["audio"] is None for row in kept[1:])
    assert "1-2-0001.flac" in kept[1]["error"]
    missing = root / "dev-clean" / "1" / "2" / "1-2-0002.flac"
    assert kept[2]["error"] == f"{missing}: file not found"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_audio_with_nan_or_infinite_samples_is_unreadable_not_silence(tmp_path, bad):
    samples = sine(1.0, 16000)
    samples[500:503] = bad
    soundfile.write(tmp_path / "damaged.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="3 NaN or infinite samples of 16000"):
        decode_audio(tmp_path / "damaged.wav")
    root = make_root(tmp_path, {"good": sine(1.0, 16000), "damaged": None})
    (root / "dev-clean" / "1" / "2" / "1-2-0001.wav").write_bytes((tmp_path / "damaged.wav").read_bytes())
    kept = list(librispeech("dev-clean", root, keep_unreadable=True))
    assert [row["audio"] is None for row in kept] == [False, True]
    assert kept[1]["error"].endswith("1-2-0001.wav: 3 NaN or infinite samples of 16000")


def test_a_missing_audio_path_is_named_in_the_error(tmp_path):
    with pytest.raises(AudioDecodeError, match="file not found"):
        decode_audio(tmp_path / "nowhere.flac")


def test_decode_audio_reads_bytes_and_paths_alike(tmp_path):
    buffer = io.BytesIO()
    soundfile.write(buffer, sine(0.25, 16000), 16000, format="FLAC")
    (tmp_path / "a.flac").write_bytes(buffer.getvalue())
    from_bytes = decode_audio({"bytes": buffer.getvalue(), "path": "a.flac"})
    from_path = decode_audio(str(tmp_path / "a.flac"))
    assert np.array_equal(from_bytes, from_path) and len(from_path) == 4000


def test_unknown_split_is_a_one_line_error_listing_the_names():
    with pytest.raises(UnknownSplitError) as error:
        librispeech("test_clean", "/nonexistent")
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, MlaConvertError)
    assert all(name in message for name in SPLITS)


@pytest.mark.parametrize("problem", ["missing", "empty", "no-subset", "no-transcripts"])
def test_a_bad_data_path_is_a_one_line_error(tmp_path, problem):
    root = tmp_path / "root"
    if problem != "missing":
        root.mkdir()
    if problem == "no-subset":
        (root / "README.TXT").write_text("not librispeech")
    if problem == "no-transcripts":
        (root / "dev-clean" / "1" / "2").mkdir(parents=True)
    with pytest.raises(DataError) as error:
        librispeech("dev-clean", root)
    assert "\n" not in str(error.value) and str(root) in str(error.value)


@needs_shared
def test_a_local_split_is_checked_and_its_ids_listed_without_decoding_audio():
    ids = split_ids("test-clean", LIBRISPEECH)
    assert check_local_split(LIBRISPEECH, "test-clean") == len(ids) == 47
    assert ids == [row["id"] for row in librispeech("test-clean", LIBRISPEECH)]
    assert split_ids("test-clean", LIBRISPEECH, limit=3) == ids[:3]
    assert split_ids("test-clean", "hub") is None  # known only while streaming
    with pytest.raises(DataError, match="no dev-other folder"):
        check_local_split(LIBRISPEECH, "dev-other")


def test_without_data_the_default_is_librispeech_root_then_the_hub(tmp_path, monkeypatch):
    root = make_root(tmp_path, {"one": sine(0.5, 16000)})
    monkeypatch.setenv("LIBRISPEECH_ROOT", str(root))
    assert resolve_source(None) == root.resolve()

    monkeypatch.delenv("LIBRISPEECH_ROOT")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as error:
        resolve_source(None)
    message = str(error.value)
    assert "\n" not in message and "--data" in message and "LIBRISPEECH_ROOT" in message


def test_an_unreachable_hub_is_not_retried(monkeypatch):
    from mla_convert.hub import access

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LIBRISPEECH_ROOT", raising=False)
    monkeypatch.setattr(access, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="--data PATH.*LIBRISPEECH_ROOT"):
        librispeech("test-other")


def _flac_bytes(audio: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="FLAC")
    return buffer.getvalue()


def test_the_hub_source_streams_openslr_with_undecoded_audio_and_the_same_decode_map(tmp_path, monkeypatch):
    """Offline stand-in for ``load_dataset("openslr/librispeech_asr", ..., streaming=True)``: the same
    parquet-backed streaming builder and columns as the Hub dataset, read from a file made here."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Audio, Features, Value

    from mla_convert.hub import access

    names = [f"3-4-{index:04d}" for index in range(2)]
    audio = [_flac_bytes(sine(1.0, 16000), 16000), _flac_bytes(sine(1.0, 8000), 8000)]
    table = pa.table(
        {
            "file": [f"{name}.flac" for name in names],
            "audio": pa.array([{"bytes": raw, "path": f"{name}.flac"} for raw, name in zip(audio, names, strict=True)]),
            "text": ["HELLO WORLD"] * 2,
            "speaker_id": [3, 3],
            "chapter_id": [4, 4],
            "id": names,
        }
    )
    pq.write_table(table, tmp_path / "validation.parquet")
    features = Features(
        {
            "file": Value("string"),
            "audio": Audio(sampling_rate=16000),
            "text": Value("string"),
            "speaker_id": Value("int64"),
            "chapter_id": Value("int64"),
            "id": Value("string"),
        }
    )
    real_load_dataset = datasets.load_dataset
    calls = []

    def hub_stand_in(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        file = str(tmp_path / "validation.parquet")
        return real_load_dataset("parquet", data_files=file, split="train", streaming=True, features=features)

    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    monkeypatch.setattr(access, "hub_offline", lambda: False)
    monkeypatch.setattr(access, "hub_reachable", lambda timeout=3.0: True)
    result = list(librispeech("dev-other", "hub"))
    assert calls == [("openslr/librispeech_asr", "other", "validation", True)]
    assert [row["id"] for row in result] == names
    assert set(result[0]) == {"id", "split", "text", "audio", "duration"}
    assert all(row["audio"].shape == (16000,) and row["split"] == "dev-other" for row in result)


def test_every_split_name_maps_to_a_hub_config_and_split():
    assert SPLITS["test-clean"] == ("clean", "test")
    assert SPLITS["dev-other"] == ("other", "validation")
    assert SPLITS["train-clean-360"] == ("clean", "train.360")
    assert SPLITS["train-other-500"] == ("other", "train.500")
    assert data.count_utterances("test-other", "hub") == 2939
