"""Checkpoint in, checkpoint out: what ``mla-convert convert`` does, callable from Python."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from .convert import check_request, convert
from .hosts import adapter_for_config
from .io import atomic_output_dir, check_output_dir, transformers_progress_bars
from .loading import load_config, load_pretrained, resolve_model_id
from .report import ConversionReport
from .specs import AttentionSpec

logger = logging.getLogger(__name__)


def save_processor(model_id: str, output: Path) -> bool:
    """Copy the feature extractor / tokenizer files so the output works with ``pipeline()``."""
    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer

    try:
        AutoProcessor.from_pretrained(model_id).save_pretrained(output)
        return True
    except (OSError, ValueError, TypeError, KeyError):
        pass
    saved = False
    for loader in (AutoFeatureExtractor, AutoTokenizer):
        try:
            loader.from_pretrained(model_id).save_pretrained(output)
            saved = True
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return saved


def convert_checkpoint(
    model_id: str,
    spec: AttentionSpec,
    output: str | Path,
    *,
    overwrite: bool = False,
    layers: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Load ``model_id``, convert it, and write model + processor + ``conversion_report.json``.

    Everything that can be checked before loading weights (output dir, spec against the config,
    supported architecture) is checked first; the output is written to a temporary directory and
    renamed only when complete.
    """
    output = check_output_dir(output, overwrite)
    model_id = resolve_model_id(model_id)
    config = load_config(model_id)
    check_request(adapter_for_config(config), config, spec, layers, targets)
    with transformers_progress_bars(progress):
        model = load_pretrained(model_id, config=config)
        report = convert(model, spec, layers=layers, targets=targets, progress=progress)
        with atomic_output_dir(output, overwrite=overwrite) as staging:
            model.save_pretrained(staging)
            if not save_processor(model_id, staging):
                logger.warning("no processor files found for %s: add them before using pipeline()", model_id)
            (staging / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
