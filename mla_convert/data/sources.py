"""Transcribed speech from any local source, as index rows (audio undecoded) or decoded rows.

A source is ``hub`` (LibriSpeech streamed), a LibriSpeech root (read by subset), or any folder of
speech: LibriSpeech ``*.trans.txt`` files below it (a subset such as ``dev-clean`` itself) or a
``transcripts.tsv`` (``id<TAB>text``) beside its audio. Calibration, fine-tuning and evaluation all
read their data through this module and :mod:`~mla_convert.data.librispeech`.
An index row is ``{"id", "text", "audio": {"path", "bytes": None}, "source"}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .audio import AUDIO_SUFFIXES, decode_audio
from .librispeech import DataError, is_librispeech_root, iter_local_index, librispeech

logger = logging.getLogger(__name__)


def find_audio(folder: Path, utterance_id: str) -> Path | None:
    candidates = (folder / f"{utterance_id}{suffix}" for suffix in AUDIO_SUFFIXES)
    return next((path for path in candidates if path.exists()), None)


def transcript_lines(folder: str | os.PathLike) -> Iterator[tuple[Path, str, str]]:
    """``(audio folder, id, text)`` from LibriSpeech ``*.trans.txt`` files (space-separated) or
    ``transcripts.tsv`` files beside the audio (tab-separated), anywhere below ``folder``."""
    folder = Path(folder)
    transcripts = sorted(folder.rglob("*.trans.txt")) + sorted(folder.rglob("transcripts.tsv"))
    if not transcripts:
        raise DataError(f"no *.trans.txt or transcripts.tsv under {folder}")
    for transcript in transcripts:
        separator = "\t" if transcript.suffix == ".tsv" else " "
        for line in transcript.read_text(encoding="utf-8").splitlines():
            utterance_id, _, text = line.strip().partition(separator)
            if utterance_id:
                yield transcript.parent, utterance_id, text.strip()


def iter_folder_index(folder: str | os.PathLike, *, transcribed: bool = True) -> Iterator[dict[str, Any]]:
    """Index rows (audio undecoded) of any folder of speech: transcribed utterances below it, or
    with ``transcribed=False`` and no transcript file, every audio file below it with empty text."""
    folder = Path(folder)
    has_transcripts = any(folder.rglob("*.trans.txt")) or any(folder.rglob("transcripts.tsv"))
    if not transcribed and not has_transcripts:
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
            yield {"id": path.stem, "text": "", "audio": {"path": str(path), "bytes": None}}
        return
    for audio_folder, utterance_id, text in transcript_lines(folder):
        path = find_audio(audio_folder, utterance_id)
        if path is None:
            logger.warning("no audio file for %s in %s", utterance_id, audio_folder)
            continue
        yield {"id": utterance_id, "text": text, "audio": {"path": str(path), "bytes": None}}


def index_source(source: str | os.PathLike, split: str, *, transcribed: bool = True) -> list[dict[str, Any]]:
    """Index rows of one local source: a LibriSpeech root's ``split`` (a root without it is a
    :class:`DataError` naming the subsets it has, never permission to read every transcript below
    it, test sets included), or every utterance of any other folder. ``source`` is recorded in
    each row. A missing folder or one without utterances is a :class:`DataError`."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise DataError(f"{source!r} does not exist or is not a folder")
    if is_librispeech_root(path):
        rows = list(iter_local_index(path, split))
    else:
        rows = list(iter_folder_index(path, transcribed=transcribed))
    if not rows:
        raise DataError(f"no utterances in {source}")
    return [{**row, "source": str(path)} for row in rows]


def index_sources(sources: Sequence[str | os.PathLike], split: str, *, transcribed: bool = True) -> list[dict]:
    """:func:`index_source` over several sources, concatenated; an id found twice is a :class:`DataError`."""
    rows = [row for source in sources for row in index_source(source, split, transcribed=transcribed)]
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise DataError(f"utterance {row['id']} appears twice in the data")
        seen.add(row["id"])
    return rows


def decoded(rows: Sequence[dict[str, Any]], sampling_rate: int) -> list[dict[str, Any]]:
    """The rows with their audio decoded (float32 mono at ``sampling_rate``)."""
    return [{**row, "audio": decode_audio(row["audio"], sampling_rate)} for row in rows]


def iter_decoded(source: str, split: str, sampling_rate: int) -> Iterator[dict[str, Any]]:
    """Decoded rows of one source, lazily: the Hub stream of ``split`` for ``hub`` (``source`` is
    then ``hub:<split>``), else :func:`index_source`'s rows, each decoded as it is read (keeping
    the file's ``path``)."""
    if source == "hub":
        for row in librispeech(split, "hub", sampling_rate):
            yield {**row, "source": f"hub:{split}"}
        return
    for row in index_source(source, split):
        yield {**row, "audio": decode_audio(row["audio"], sampling_rate), "path": row["audio"]["path"]}
