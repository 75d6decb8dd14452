"""LibriSpeech: its subsets, a local root in the official layout, and the streaming reader.

:func:`librispeech` gives a subset as a streaming ``datasets.IterableDataset`` from either source:

* the Hub (``openslr/librispeech_asr``, streamed; nothing is downloaded up front), or
* an extracted LibriSpeech root in the official tarball layout
  (``<root>/<subset>/<speaker>/<chapter>/<id>.flac`` plus ``<speaker>-<chapter>.trans.txt``),
  wrapped with ``IterableDataset.from_generator`` so that local runs go through the same
  streaming code as Hub runs.

Either way the audio column arrives undecoded (``Audio(decode=False)``: bytes or a path) and is
decoded by the same ``.map`` through :func:`~mla_convert.data.audio.decode_audio`. Every row is
``{"id", "split", "text", "audio": float32 mono numpy array at sampling_rate, "duration"}``.
This module is the one place that knows the root's layout (:func:`local_split_dir`,
:func:`is_librispeech_root`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from ..errors import MlaConvertError
from .audio import AUDIO_SUFFIXES, AudioDecodeError, decode_audio

logger = logging.getLogger(__name__)

HUB_DATASET = "openslr/librispeech_asr"
ENV_ROOT = "LIBRISPEECH_ROOT"

# LibriSpeech subset name -> (Hub config, Hub split)
SPLITS: dict[str, tuple[str, str]] = {
    "test-clean": ("clean", "test"),
    "test-other": ("other", "test"),
    "dev-clean": ("clean", "validation"),
    "dev-other": ("other", "validation"),
    "train-clean-100": ("clean", "train.100"),
    "train-clean-360": ("clean", "train.360"),
    "train-other-500": ("other", "train.500"),
}

# Utterances per subset in the full corpus (progress bars for Hub runs).
CORPUS_SIZES: dict[str, int] = {
    "test-clean": 2620,
    "test-other": 2939,
    "dev-clean": 2703,
    "dev-other": 2864,
    "train-clean-100": 28539,
    "train-clean-360": 104014,
    "train-other-500": 148688,
}


class DataError(MlaConvertError):
    """The requested data cannot be read (unknown split, missing or empty root, unreachable Hub)."""


class UnknownSplitError(DataError, ValueError):
    """A split name that is not one of the LibriSpeech subsets."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UnknownSplitError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return split


def _hub_unreachable_error(reason: str) -> DataError:
    return DataError(
        f"cannot stream {HUB_DATASET} from the Hugging Face Hub ({reason}): pass --data PATH to an extracted "
        f"LibriSpeech root, or set the {ENV_ROOT} environment variable"
    )


def resolve_source(source: str | os.PathLike | None = None, *, check_hub: bool = True) -> str | Path:
    """``"hub"`` or the Path of a local LibriSpeech root.

    ``None`` means ``$LIBRISPEECH_ROOT`` if set, else the Hub. With ``check_hub``, choosing the Hub
    while it is unreachable (or ``HF_HUB_OFFLINE`` is set, in which case no connection is tried)
    raises a one-line :class:`DataError` naming ``--data`` and ``LIBRISPEECH_ROOT``.
    """
    if source is None or str(source) == "":
        source = os.environ.get(ENV_ROOT) or "hub"
    if str(source) == "hub":
        if check_hub:
            from ..hub.access import hub_offline, hub_reachable

            if hub_offline():
                raise _hub_unreachable_error("HF_HUB_OFFLINE is set")
            if not hub_reachable():
                raise _hub_unreachable_error("no connection")
        return "hub"
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"LibriSpeech data path {str(source)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"LibriSpeech data path {str(source)!r} is not a directory")
    if not any(root.iterdir()):
        raise DataError(f"LibriSpeech data path {str(source)!r} is empty")
    return root.resolve()


def source_label(source: str | Path) -> str:
    return "hub" if str(source) == "hub" else str(source)


def local_split_dir(root: str | os.PathLike, split: str) -> Path:
    """``<root>/<split>``; ``<root>/LibriSpeech/<split>`` (the tarballs' top folder) is accepted too."""
    check_split(split)
    root = Path(root)
    for candidate in (root / split, root / "LibriSpeech" / split):
        if candidate.is_dir():
            return candidate
    present = sorted(p.name for base in (root, root / "LibriSpeech") if base.is_dir() for p in base.iterdir())
    present = [name for name in present if name in SPLITS]
    found = f"; it has {', '.join(present)}" if present else "; it has no LibriSpeech subset folders"
    raise DataError(
        f"no {split} folder under {root} (expected the official layout <root>/{split}/<spk>/<chapter>){found}"
    )


def is_librispeech_root(path: str | os.PathLike, split: str | None = None) -> bool:
    """Whether ``path`` is a LibriSpeech root: it holds ``split`` (``<root>/<split>`` or
    ``<root>/LibriSpeech/<split>``), or, with ``split=None``, any subset folder. A root is read by
    subset, never wholesale (its test sets must not leak into training or calibration)."""
    path = Path(path).expanduser()
    names = [split] if split is not None else list(SPLITS)
    return any((base / name).is_dir() for base in (path, path / "LibriSpeech") for name in names)


def _audio_file(chapter_dir: Path, utterance_id: str) -> Path:
    for suffix in AUDIO_SUFFIXES:
        candidate = chapter_dir / f"{utterance_id}{suffix}"
        if candidate.exists():
            return candidate
    return chapter_dir / f"{utterance_id}.flac"  # missing: reported when decoding


def iter_local_index(root: str | os.PathLike, split: str) -> Iterator[dict[str, Any]]:
    """``{"id", "split", "text", "audio": {"path", "bytes": None}}`` per transcript line, in a fixed order."""
    subset = local_split_dir(root, split)
    for transcript in sorted(subset.glob("*/*/*.trans.txt")):
        for line in transcript.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            utterance_id, _, text = line.partition(" ")
            path = _audio_file(transcript.parent, utterance_id)
            yield {
                "id": utterance_id,
                "split": split,
                "text": text.strip(),
                "audio": {"path": str(path), "bytes": None},
            }


def check_local_split(root: str | os.PathLike, split: str) -> int:
    """The number of utterances of ``split`` under a local root; a one-line :class:`DataError` when
    the subset folder is missing or holds no transcripts (cheap: reads the transcript files only)."""
    subset = local_split_dir(root, split)
    count = sum(1 for _ in iter_local_index(root, split))
    if not count:
        raise DataError(f"no utterances in {subset} (no <spk>-<chapter>.trans.txt files)")
    return count


def split_ids(split: str, source: str | Path, limit: int | None = None) -> list[str] | None:
    """The utterance ids a run of ``split`` reads (the first ``limit``), in order; ``None`` for the
    Hub, whose ids are only known while streaming."""
    if str(source) == "hub":
        return None
    ids = [row["id"] for row in iter_local_index(source, split)]
    return ids[:limit] if limit is not None else ids


def count_utterances(split: str, source: str | Path) -> int | None:
    """Utterances in a split: counted for a local root, the corpus size for the Hub."""
    check_split(split)
    if str(source) == "hub":
        return CORPUS_SIZES.get(split)
    return sum(1 for _ in iter_local_index(source, split))


def _decode_row(row: dict[str, Any], split: str, sampling_rate: int) -> dict[str, Any]:
    audio = row["audio"]
    try:
        array = decode_audio(audio, sampling_rate)
    except AudioDecodeError as error:
        name = (audio or {}).get("path") or row.get("id")
        return {"audio": None, "duration": 0.0, "split": split, "error": f"{name}: {error}"}
    return {"audio": array, "duration": len(array) / sampling_rate, "split": split, "error": None}


def _keep_readable(row: dict[str, Any]) -> bool:
    if row["error"] is None:
        return True
    logger.warning("skipping unreadable audio %s", row["error"])
    return False


def _hub_raw(split: str):
    from datasets import Audio, load_dataset

    config, hub_split = SPLITS[split]
    try:
        dataset = load_dataset(HUB_DATASET, config, split=hub_split, streaming=True)
    except Exception as error:  # connection errors surface as many exception types
        raise DataError(
            f"cannot stream {HUB_DATASET} ({config}/{hub_split}): {(str(error).strip() or repr(error)).splitlines()[0]}"
            f"; pass --data PATH to an extracted LibriSpeech root, or set {ENV_ROOT}"
        ) from error
    return dataset.cast_column("audio", Audio(decode=False))


def librispeech(
    split: str,
    source: str | os.PathLike | None = "hub",
    sampling_rate: int = 16000,
    *,
    limit: int | None = None,
    exclude_ids: Collection[str] | None = None,
    keep_unreadable: bool = False,
    shard: tuple[int, int] | None = None,
):
    """A LibriSpeech subset as a streaming ``datasets.IterableDataset``.

    ``split`` is a LibriSpeech subset name (see :data:`SPLITS`); ``source`` is ``"hub"``, a local
    root, or ``None`` for ``$LIBRISPEECH_ROOT``-else-Hub. ``limit`` keeps the first N utterances of
    the subset and ``exclude_ids`` then drops utterances before their audio is decoded (resuming).
    Unreadable audio (a corrupt or missing file, NaN or infinite samples) is skipped with a logged
    warning naming the file; with ``keep_unreadable`` such rows come
    through instead with ``audio=None`` and the reason in ``error``, so a caller can count them.
    ``shard=(rank, world_size)`` keeps one process's share of what is left
    (``datasets.distributed.split_dataset_by_node``: whole Hub shards when their count divides by
    the world size, else every ``world_size``-th utterance), before any audio is decoded.
    """
    from datasets import IterableDataset

    check_split(split)
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1 (got {limit})")
    source = resolve_source(source)
    if source == "hub":
        dataset = _hub_raw(split)
    else:
        check_local_split(source, split)  # fail now, with the layout in the message
        dataset = IterableDataset.from_generator(iter_local_index, gen_kwargs={"root": str(source), "split": split})
    if limit is not None:
        dataset = dataset.take(limit)
    if exclude_ids:
        excluded = frozenset(exclude_ids)
        dataset = dataset.filter(lambda row: row["id"] not in excluded)
    if shard is not None and shard[1] > 1:
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(dataset, rank=shard[0], world_size=shard[1])
    # Extra Hub columns (file, speaker_id, chapter_id) go in the decode map: ``remove_columns`` on a
    # stream whose features hold an Audio column re-encodes every row, which imports torchcodec.
    extra = [name for name in (dataset.column_names or []) if name not in {"id", "text", "audio"}]
    dataset = dataset.map(
        _decode_row, fn_kwargs={"split": split, "sampling_rate": sampling_rate}, remove_columns=extra or None
    )
    if not keep_unreadable:
        dataset = dataset.filter(_keep_readable).remove_columns(["error"])
    return dataset
