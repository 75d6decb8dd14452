"""Calibration overlap: refuse to score a model on utterances its conversion was calibrated on."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

from ..data import split_ids
from ..errors import first_line
from .errors import EvaluationError

CONVERSION_REPORT = "conversion_report.json"


def conversion_report(path: str) -> dict | None:
    """The ``conversion_report.json`` saved with a converted model (a local directory, or a Hub id's
    cached files); ``None`` when there is none."""
    local = Path(path).expanduser()
    file: Path | None = None
    if local.is_dir():
        file = local / CONVERSION_REPORT
    elif not local.exists():
        with contextlib.suppress(Exception):  # not a valid repo id, no cache: no report
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, CONVERSION_REPORT)
            file = Path(cached) if isinstance(cached, str) else None
    if file is None or not file.is_file():
        return None
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{file} is not readable JSON: {first_line(error)}") from error
    return report if isinstance(report, dict) else None


def calibrated_ids(report: dict | None) -> frozenset[str]:
    """Utterances a conversion saw: fitted on (``calibration_ids``) or measured on (``held_out_ids``)."""
    if not report:
        return frozenset()
    return frozenset(str(i) for key in ("calibration_ids", "held_out_ids") for i in report.get(key) or [])


class CalibrationOverlapError(EvaluationError):
    """The split to score holds utterances the model was calibrated on."""


def overlap_error(model_id: str, split: str, overlap: Sequence[str]) -> CalibrationOverlapError:
    return CalibrationOverlapError(
        f"{model_id} was calibrated on {len(overlap)} utterance(s) of {split} (e.g. {sorted(overlap)[0]}, "
        f"in its {CONVERSION_REPORT}): scoring it there would be biased; evaluate it on another split"
    )


def check_not_calibrated_on(
    model_id: str, report: dict | None, split: str, source: str | Path, limit: int | None = None
) -> None:
    """Refuse (one line) a split holding utterances the model's conversion was calibrated on. Local
    data: the split's ids are compared; the Hub: a model calibrated on ``hub`` (dev-clean) is refused
    dev-clean, and the stream is checked as it is read."""
    seen = calibrated_ids(report)
    if not seen:
        return
    ids = split_ids(split, source, limit)
    if ids is not None:
        overlap = [i for i in ids if i in seen]
        if overlap:
            raise overlap_error(model_id, split, overlap)
    elif split == "dev-clean" and "hub" in (report.get("calibration_sources") or []):
        raise overlap_error(model_id, split, sorted(seen))
