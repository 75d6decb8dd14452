"""Scoring normalised text: jiwer edit counts per utterance, split totals, and ``evaluate``'s WER."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import first_line
from .model import quiet_transformers

logger = logging.getLogger(__name__)


def score(reference: str, hypothesis: str) -> dict[str, int]:
    """Word and character edit counts of one normalised pair (jiwer)."""
    import jiwer

    counts: dict[str, int] = {}
    if reference:
        words = jiwer.process_words(reference, hypothesis)
        chars = jiwer.process_characters(reference, hypothesis)
        counts.update(
            substitutions=words.substitutions,
            deletions=words.deletions,
            insertions=words.insertions,
            hits=words.hits,
            char_substitutions=chars.substitutions,
            char_deletions=chars.deletions,
            char_insertions=chars.insertions,
            char_hits=chars.hits,
        )
    else:
        counts.update(substitutions=0, deletions=0, insertions=len(hypothesis.split()), hits=0)
        counts.update(char_substitutions=0, char_deletions=0, char_insertions=len(hypothesis), char_hits=0)
    counts["reference_words"] = counts["substitutions"] + counts["deletions"] + counts["hits"]
    counts["reference_chars"] = counts["char_substitutions"] + counts["char_deletions"] + counts["char_hits"]
    counts["word_errors"] = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    counts["char_errors"] = counts["char_substitutions"] + counts["char_deletions"] + counts["char_insertions"]
    return counts


def _rate(errors: int, total: int) -> float | None:
    return errors / total if total else None


def totals(records: Iterable[dict]) -> dict[str, Any]:
    """Split totals recomputed from journal records of one model and split."""
    utterances = [r for r in records if r.get("type") == "utterance"]
    summed = {
        key: sum(int(r[key]) for r in utterances)
        for key in (
            "substitutions",
            "deletions",
            "insertions",
            "hits",
            "reference_words",
            "word_errors",
            "char_substitutions",
            "char_deletions",
            "char_insertions",
            "reference_chars",
            "char_errors",
        )
    }
    audio = sum(float(r["duration"]) for r in utterances)
    # records of a launched run name their rank: ranks decode at the same time, so the wall time
    # is the busiest rank's, and decode_seconds (the compute spent) the sum over ranks
    per_rank: dict[int, float] = {}
    for r in utterances:
        per_rank[int(r.get("rank", 0))] = per_rank.get(int(r.get("rank", 0)), 0.0) + float(r["seconds"])
    wall = max(per_rank.values(), default=0.0)
    limits = [bool(r["hit_generation_limit"]) for r in utterances if r.get("hit_generation_limit") is not None]
    with_window = [r for r in utterances if "truncated" in r]
    return {
        "wer": _rate(summed["word_errors"], summed["reference_words"]),
        "cer": _rate(summed["char_errors"], summed["reference_chars"]),
        "utterances": len(utterances),
        "unreadable": sum(1 for r in records if r.get("type") == "unreadable"),
        "audio_seconds": audio,
        "wall_seconds": wall,
        "decode_seconds": sum(per_rank.values()),
        "real_time_factor": wall / audio if audio else None,
        **summed,
        # seq2seq only (null for CTC): utterances whose generation stopped at max_new_tokens
        "generation_limit_hits": sum(limits) if limits else None,
        # fixed-window models (Whisper: 30 s) only: longer utterances were scored on their first 30 s
        "truncated_utterances": sum(bool(r["truncated"]) for r in with_window) if with_window else None,
    }


_HF_WER: Any = None


def _hf_wer_script_cached() -> bool:
    """Whether ``evaluate.load("wer")`` can work offline: its script is in the modules cache (checked
    without importing ``evaluate``, which alone takes seconds)."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    modules = Path(os.environ.get("HF_MODULES_CACHE") or Path(home) / "modules").expanduser()
    return any((modules / "evaluate_modules" / "metrics").glob("*--wer/*/wer.py"))


def hf_evaluate_wer(references: list[str], hypotheses: list[str]) -> float | None:
    """The ``evaluate`` library's WER where its metric script loads offline (cache); never required."""
    global _HF_WER
    if _HF_WER is False or not references:
        return None
    if _HF_WER is None:
        from ..hub.access import hub_offline, hub_reachable

        _HF_WER = False
        if (not hub_offline() and hub_reachable(timeout=2.0)) or _hf_wer_script_cached():
            try:
                import evaluate as hf_evaluate

                with quiet_transformers():
                    _HF_WER = hf_evaluate.load("wer")
            except Exception as error:  # missing script, offline, network: all mean "not available"
                logger.info("evaluate's wer metric is not available: %s", first_line(error))
    if _HF_WER is False:
        return None
    try:
        return float(_HF_WER.compute(references=references, predictions=hypotheses))
    except Exception:
        return None
