"""``mla-convert evaluate``: word and character error rates of speech recognisers on LibriSpeech.

One run evaluates several models on several splits and writes two files:

* ``NAME.jsonl``, the journal: a header line, then one line per scored utterance (normalised
  reference and hypothesis, error counts), flushed and fsynced after every batch. A killed run
  restarted with the same command reads it, skips the utterances it holds and goes on; a torn last
  line is ignored.
* ``NAME.json``, written once at the end (temp file + rename): per model and split, totals
  recomputed from the journal (WER, CER, S/D/I, audio and wall seconds, real-time factor, peak
  memory, attention spec and K/V-state bytes per frame of converted models, ...).

Everything cheap (data, splits, limit, batch size, output, model configs, calibration overlap with
the splits) is checked before a model is loaded. A batch that runs out of memory is halved and
retried; converted models run their saved remote code unless the installed classes are asked for.

Audio comes from :func:`mla_convert.data.librispeech` (a streaming ``IterableDataset``); a
background thread decodes it and builds the model inputs ahead of the model, in batches sorted by
length within a bounded buffer. Wall seconds run from the first audio read to the last batch scored
(model loading excluded), shared out per utterance in the journal, so a resumed run adds up too.

The package, one job a module: :mod:`.model` (loading a recogniser, inference), :mod:`.normalize`
and :mod:`.scoring` (text normalisation, error counts, totals), :mod:`.batching` (batches, prefetch,
utterance records), :mod:`.memory` (out-of-memory halving, peak memory), :mod:`.journal` (the run's
files), :mod:`.kv_state` (K/V-state bytes per frame), :mod:`.overlap` (calibration overlap) and
:mod:`.run` (:func:`evaluate_models`, the summary, the text table).
"""

from __future__ import annotations

from .batching import Prefetcher, length_sorted_batches, utterance_records
from .errors import EvaluationError, NotSpeechRecognitionError
from .journal import JOURNAL_VERSION, Journal, check_output, default_output
from .kv_state import attention_report
from .memory import OUT_OF_MEMORY_MESSAGES, is_out_of_memory, transcribe_splitting_on_oom
from .model import (
    MAX_NEW_TOKENS_BASE,
    MAX_NEW_TOKENS_PER_SECOND,
    ASRModel,
    Transcripts,
    asr_kind,
    check_model,
    is_converted,
    load_asr_model,
    resolve_device,
)
from .normalize import LIBRISPEECH, WHISPER_ENGLISH, librispeech_normalize, normalizer_for, whisper_english_normalizer
from .overlap import (
    CONVERSION_REPORT,
    CalibrationOverlapError,
    calibrated_ids,
    check_not_calibrated_on,
    conversion_report,
)
from .run import BUFFER_BATCHES, DEFAULT_BATCH_SIZE, DEFAULT_SPLITS, evaluate_models, format_results, summarize
from .scoring import hf_evaluate_wer, score, totals

__all__ = [
    "BUFFER_BATCHES",
    "CONVERSION_REPORT",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SPLITS",
    "JOURNAL_VERSION",
    "LIBRISPEECH",
    "MAX_NEW_TOKENS_BASE",
    "MAX_NEW_TOKENS_PER_SECOND",
    "OUT_OF_MEMORY_MESSAGES",
    "WHISPER_ENGLISH",
    "ASRModel",
    "CalibrationOverlapError",
    "EvaluationError",
    "Journal",
    "NotSpeechRecognitionError",
    "Prefetcher",
    "Transcripts",
    "asr_kind",
    "attention_report",
    "calibrated_ids",
    "check_model",
    "check_not_calibrated_on",
    "check_output",
    "conversion_report",
    "default_output",
    "evaluate_models",
    "format_results",
    "hf_evaluate_wer",
    "is_converted",
    "is_out_of_memory",
    "length_sorted_batches",
    "librispeech_normalize",
    "load_asr_model",
    "normalizer_for",
    "resolve_device",
    "score",
    "summarize",
    "totals",
    "transcribe_splitting_on_oom",
    "utterance_records",
    "whisper_english_normalizer",
]
