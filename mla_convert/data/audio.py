"""Decoding audio: soundfile (FLAC/WAV/OGG; no torchcodec or FFmpeg), downmix to mono, resample
with ``scipy.signal.resample_poly``. Audio with NaN or infinite samples counts as unreadable, like a
corrupt or missing file. Every reader of this package (the LibriSpeech stream, calibration,
fine-tuning batches) decodes through :func:`decode_audio`."""

from __future__ import annotations

import io
import os
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import first_line

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg")


class AudioDecodeError(Exception):
    """One audio file could not be decoded; the pipeline skips it and counts it."""


def to_mono(array: np.ndarray) -> np.ndarray:
    """Average the channels of a ``(frames, channels)`` array (soundfile's layout)."""
    return array.mean(axis=1) if array.ndim == 2 else array


def resample(array: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return array
    divisor = gcd(int(rate), int(target))
    from scipy.signal import resample_poly

    return resample_poly(array, target // divisor, rate // divisor).astype(np.float32, copy=False)


def decode_audio(audio: dict[str, Any] | str | os.PathLike, sampling_rate: int = 16000) -> np.ndarray:
    """Decode an undecoded ``Audio`` value (bytes or path) to float32 mono at ``sampling_rate``."""
    import soundfile

    if isinstance(audio, (str, os.PathLike)):
        audio = {"path": str(audio), "bytes": None}
    raw, path = audio.get("bytes"), audio.get("path")
    if raw is None and path and not Path(path).exists():
        raise AudioDecodeError("file not found")
    try:
        if raw is not None:
            array, rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=False)
        elif path:
            array, rate = soundfile.read(path, dtype="float32", always_2d=False)
        else:
            raise AudioDecodeError("no audio bytes or path")
    except AudioDecodeError:
        raise
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, OSError...
        raise AudioDecodeError(first_line(error)) from error
    array = to_mono(np.asarray(array, dtype=np.float32))
    if array.size == 0:
        raise AudioDecodeError("no samples")
    if not np.isfinite(array).all():  # would score as silence (all deletions) or poison a batch
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise AudioDecodeError(f"{bad} NaN or infinite samples of {array.size}")
    return np.ascontiguousarray(resample(array, int(rate), int(sampling_rate)), dtype=np.float32)


def audio_seconds(audio: dict[str, Any] | str | os.PathLike) -> float:
    """Duration from the file header of an undecoded ``Audio`` value with a path (no decoding)."""
    import soundfile

    path = audio if isinstance(audio, (str, os.PathLike)) else audio["path"]
    return float(soundfile.info(str(path)).duration)
