"""The one audio + transcript source of this package.

* :mod:`.audio`: decoding any audio file to float32 mono at a sampling rate;
* :mod:`.librispeech`: LibriSpeech subsets, a local root's layout, the streaming reader (Hub or root);
* :mod:`.sources`: any local source (root, subset folder, ``transcripts.tsv`` folder) as index rows;
* :mod:`.holdout`: held-out shares, the test splits, overlap checks.

Evaluation, calibration and fine-tuning import from here; none reads audio its own way.
"""

from __future__ import annotations

from .audio import AUDIO_SUFFIXES, AudioDecodeError, audio_seconds, decode_audio, resample, to_mono
from .holdout import EVALUATION_SPLITS, HELD_OUT_EVERY, evaluation_split_in, hold_out, shared_ids, split_overlap
from .librispeech import (
    CORPUS_SIZES,
    ENV_ROOT,
    HUB_DATASET,
    SPLITS,
    DataError,
    UnknownSplitError,
    check_local_split,
    check_split,
    count_utterances,
    is_librispeech_root,
    iter_local_index,
    librispeech,
    local_split_dir,
    resolve_source,
    source_label,
    split_ids,
)
from .sources import (
    decoded,
    find_audio,
    index_source,
    index_sources,
    iter_decoded,
    iter_folder_index,
    transcript_lines,
)

__all__ = [
    "AUDIO_SUFFIXES",
    "CORPUS_SIZES",
    "ENV_ROOT",
    "EVALUATION_SPLITS",
    "HELD_OUT_EVERY",
    "HUB_DATASET",
    "SPLITS",
    "AudioDecodeError",
    "DataError",
    "UnknownSplitError",
    "audio_seconds",
    "check_local_split",
    "check_split",
    "count_utterances",
    "decode_audio",
    "decoded",
    "evaluation_split_in",
    "find_audio",
    "hold_out",
    "index_source",
    "index_sources",
    "is_librispeech_root",
    "iter_decoded",
    "iter_folder_index",
    "iter_local_index",
    "librispeech",
    "local_split_dir",
    "resample",
    "resolve_source",
    "shared_ids",
    "source_label",
    "split_ids",
    "split_overlap",
    "to_mono",
    "transcript_lines",
]
