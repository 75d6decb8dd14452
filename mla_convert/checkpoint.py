"""Checkpoint in, checkpoint out: what ``mla-convert convert`` does, callable from Python."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .calibration import calibration_utterances, check_calibration_sources, check_disjoint, split_held_out
from .errors import SpecError
from .hosts import adapter_for_config
from .io import atomic_output_dir, check_output_dir, transformers_progress_bars
from .loading import load_config, load_pretrained, resolve_model_id
from .processor_files import write_processor_files
from .report import ConversionReport
from .specs import AttentionSpec, GQASpec, LinearSpec, MLASpec
from .surgery import check_request, convert

logger = logging.getLogger(__name__)


def save_processor(model_id: str, output: Path) -> bool:
    """Copy the feature extractor / tokenizer files so the output works with ``pipeline()``."""
    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer

    try:
        write_processor_files(AutoProcessor.from_pretrained(model_id), output)
        return True
    except (OSError, ValueError, TypeError, KeyError):
        pass
    saved = False
    for loader in (AutoFeatureExtractor, AutoTokenizer):
        try:
            write_processor_files(loader.from_pretrained(model_id), output)
            saved = True
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return saved


_CALIBRATION_CACHE: dict[tuple, tuple] = {}

CALIBRATION_FIX = "add --calibration hub (LibriSpeech dev-clean from the Hub) or --calibration /path/to/LibriSpeech"
MEASURED_IN = "results/whisper_tiny_en.md"


def uncalibrated_advice(spec: AttentionSpec, config) -> str | None:
    """One line when ``spec`` without calibration audio is a conversion the committed tables show to
    be unusable (``results/whisper_tiny_en.md``: Whisper tiny.en, no fine-tuning), else ``None``.

    Flagged: GQA by mean-pooling, linear attention with the copied weights and the fixed elu map, and
    MLA by plain SVD below half the lossless latent size (a latent as wide as the model for the joint
    layout, twice that split; for ``cache_budget``, below 0.25 of the original K/V values).
    """
    if isinstance(spec, GQASpec) and spec.init == "mean-pool":
        return (
            f"GQA by mean-pooling the trained heads, uncalibrated, decodes at 92-219% WER on Whisper tiny.en "
            f"({MEASURED_IN}); {CALIBRATION_FIX} for the calibrated GQA init (6.4-7.4% WER)"
        )
    if isinstance(spec, LinearSpec) and spec.feature_map == "elu":
        return (
            f"linear attention with the copied weights (elu), uncalibrated, decodes at 202% WER on Whisper "
            f"tiny.en ({MEASURED_IN}); use --feature-map hedgehog and {CALIBRATION_FIX.removeprefix('add ')}"
        )
    if isinstance(spec, MLASpec) and spec.init in ("svd", "svd-split"):
        hidden = int(getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or 0)
        lossless = hidden * (2 if spec.latent_layout == "split" else 1)
        if spec.latent_dim is not None and hidden and spec.latent_dim < lossless / 2:
            size = f"latent_dim {spec.latent_dim} (below half the lossless {lossless})"
        elif spec.cache_budget is not None and spec.cache_budget < 0.25:
            size = f"cache budget {spec.cache_budget} (below half the lossless 0.5)"
        else:
            return None
        return (
            f"MLA by plain SVD at {size}, uncalibrated, decodes at 90-97% WER on Whisper tiny.en at 1/4 and "
            f"1/8 of the lossless size ({MEASURED_IN}); {CALIBRATION_FIX} for the calibrated init"
        )
    return None


def _calibration_batches(model_id, model, adapter, sources, samples, use_text, exclude_ids):
    """Calibration utterances, split fit / held-out, turned into model inputs (for a decoder this
    runs greedy decoding). Kept for the next conversion of the same model in this process, so a
    table of variants decodes the calibration audio once; the build time is reported each time."""
    key = (str(model_id), tuple(sources), samples, use_text)
    if key not in _CALIBRATION_CACHE:
        from transformers import AutoProcessor

        started = time.perf_counter()
        processor = AutoProcessor.from_pretrained(model_id)
        rate = getattr(getattr(processor, "feature_extractor", processor), "sampling_rate", 16000)
        rows = calibration_utterances(sources, samples, rate)
        fit, held_out = split_held_out(rows)
        fit_batches = list(adapter.calibration_inputs(model, processor, fit, use_text))
        held_out_batches = list(adapter.calibration_inputs(model, processor, held_out, use_text))
        _CALIBRATION_CACHE.clear()
        _CALIBRATION_CACHE[key] = (fit, held_out, fit_batches, held_out_batches, time.perf_counter() - started)
    fit, held_out, fit_batches, held_out_batches, seconds = _CALIBRATION_CACHE[key]
    check_disjoint(fit + held_out, exclude_ids)
    return fit, held_out, fit_batches, held_out_batches, seconds


def convert_checkpoint(
    model_id: str,
    spec: AttentionSpec,
    output: str | Path,
    *,
    overwrite: bool = False,
    layers: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    calibration: Sequence[str] | None = None,
    calibration_samples: int | None = 64,
    calibration_text: bool = False,
    exclude_ids: Iterable[str] = (),
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Load ``model_id``, convert it, and write model + processor + ``conversion_report.json``.

    ``calibration`` names calibration audio sources (``hub``, a LibriSpeech root, or folders in
    the LibriSpeech layout); every fifth utterance is held out for the report's activation errors,
    and no utterance may share an id with ``exclude_ids`` (the evaluation data). Without it, a spec
    the committed results show to be unusable uncalibrated (:func:`uncalibrated_advice`) is reported
    through ``warn`` (default: a logging warning) before the weights are loaded.
    Everything that can be checked before loading weights (output dir, spec against the config,
    supported architecture) is checked first; the output is written to a temporary directory and
    renamed only when complete.
    """
    output = check_output_dir(output, overwrite)
    requested_id, model_id = model_id, resolve_model_id(model_id)
    config = load_config(model_id)
    adapter = adapter_for_config(config)
    check_request(adapter, config, spec, layers, targets)
    if spec.needs_calibration and not calibration:
        raise SpecError(f"{spec.calibrated_option} needs calibration audio (--calibration hub|PATH ...)")
    if calibration and calibration_samples is not None and calibration_samples < 1:
        raise SpecError(f"--calibration-samples must be at least 1, got {calibration_samples}")
    if calibration:
        check_calibration_sources(calibration)  # test splits and missing folders: before any loading
    advice = None if calibration else uncalibrated_advice(spec, config)
    if advice:
        (warn or logger.warning)(advice)
    with transformers_progress_bars(progress):
        model = load_pretrained(model_id, config=config)
        fit_batches = held_out_batches = None
        if calibration:
            fit, held_out, fit_batches, held_out_batches, build_seconds = _calibration_batches(
                model_id, model, adapter, calibration, calibration_samples, calibration_text, exclude_ids
            )
        report = convert(
            model,
            spec,
            layers=layers,
            targets=targets,
            calibration=fit_batches,
            held_out=held_out_batches,
            progress=progress,
        )
        report.base_model = requested_id
        if calibration:
            report.calibration_seconds += build_seconds
            report.calibration_sources = list(calibration)
            report.calibration_ids = [row["id"] for row in fit]
            report.held_out_ids = [row["id"] for row in held_out]
            report.calibration_text = calibration_text
        with atomic_output_dir(output, overwrite=overwrite) as staging:
            model.save_pretrained(staging)
            if not save_processor(model_id, staging):
                logger.warning("no processor files found for %s: add them before using pipeline()", model_id)
            (staging / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
