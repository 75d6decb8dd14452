"""Keeping data apart: the held-out share of a set, the test splits no fit may see, and overlap checks.

One rule each, used by calibration (fit vs. held-out utterances, never a test split), fine-tuning
(model-selection hold-out, training vs. test) and evaluation (never score on calibration data).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from .librispeech import iter_local_index

T = TypeVar("T")

HELD_OUT_EVERY = 5
# The LibriSpeech subsets models are scored on: never calibration or training data.
EVALUATION_SPLITS = ("test-clean", "test-other")


def hold_out(rows: Sequence[T], every: int = HELD_OUT_EVERY) -> tuple[list[T], list[T]]:
    """``(kept, held)``: every ``every``-th row (the 5th, 10th, ...) is held out, in order."""
    held = list(rows[every - 1 :: every])
    kept = [row for index, row in enumerate(rows) if index % every != every - 1]
    return kept, held


def evaluation_split_in(path: str | os.PathLike) -> str | None:
    """The LibriSpeech test split a path lies in (``.../test-clean/...``), else ``None``."""
    return next((part for part in Path(path).parts if part in EVALUATION_SPLITS), None)


def shared_ids(ids: Iterable[str], others: Iterable[str]) -> list[str]:
    """The utterance ids found in both, sorted."""
    return sorted(set(ids) & set(others))


def split_overlap(ids: Iterable[str], split: str, root: str | os.PathLike) -> list[str]:
    """The ids of ``ids`` that are utterances of ``split`` under a local LibriSpeech root, sorted."""
    return shared_ids(ids, (row["id"] for row in iter_local_index(root, split)))
