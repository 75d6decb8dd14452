"""Running the demo's rows: each variant converted from the original (one calibration pass shared by
all calibrated rows), then all evaluated in one run."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..checkpoint import convert_checkpoint
from ..evaluation import evaluate_models
from ..importers.bundled import BUNDLED_WHISPER
from ..loading import load_config, resolve_model_id
from .plan import DemoPlan
from .variants import DEFAULT_SPLITS, DEMO_NAME, DEMO_NOTES, Variant

logger = logging.getLogger(__name__)


def _quiet_advice(message: str) -> None:
    """The demo's plain rows are deliberate: convert_checkpoint's "use calibration" advice is not shown."""
    logger.debug("%s", message)


def _decoder_cache_bytes(config, report=None) -> int:
    """Bytes the decoder self-attention cache holds per generated token (all layers, fp32)."""
    if report is not None:
        return report.state_bytes_per_frame_after
    from ..hosts import adapter_for_config
    from ..modeling.attention_build import state_values

    layout = adapter_for_config(config).attention_layout(config).values()
    return sum(state_values(None, geometry) for role, geometry in layout if role == "decoder") * 4


def _layer_sizes(report) -> list[int] | None:
    """Per-layer latent sizes of an MLA budget conversion (from the layer reports)."""
    spec = report.spec or {}
    if spec.get("cache_budget") is None:
        return None
    # a joint latent holds latent_dim values per token and layer
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(report.dtype).removeprefix("torch."), 4)
    return [layer.state_bytes_per_frame_after // itemsize for layer in report.layers]


def run_variants(
    variants: Sequence[Variant],
    *,
    base: str = BUNDLED_WHISPER,
    data: str | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    checkpoints_dir: str | Path = "checkpoints/demo",
    results_dir: str | Path = "results/demo",
    progress: bool = True,
    calibration_samples: int | None = None,
    announce: Callable[[str], None] | None = None,
) -> tuple[list[dict], Path]:
    """Convert every variant, evaluate all of them in one run, return the table rows and the JSON.

    Calibrated variants with the same sources share one calibration pass: ``convert_checkpoint``
    keeps the decoded calibration batches of the last (model, sources, samples) it saw.
    ``announce`` receives one line per step (progress for the CLI).
    """
    say = announce or logger.info
    base_dir = resolve_model_id(base)
    config = load_config(base_dir)
    evaluation_ids = _evaluation_ids(data, splits) if any(v.calibration for v in variants) else []
    base_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base.removeprefix("bundled:")).strip("-")
    conversions = [v for v in variants if v.spec is not None]
    model_ids, cache_bytes, calibration_seconds, convert_seconds, extras = [], [], [], [], []
    calibrated_seen = False
    for variant in variants:
        if variant.spec is None:
            model_ids.append(base_dir)
            cache_bytes.append(_decoder_cache_bytes(config))
            calibration_seconds.append(None)
            convert_seconds.append(None)
            extras.append({})
            continue
        index = conversions.index(variant) + 1
        first_calibrated = bool(variant.calibration) and not calibrated_seen
        calibrated_seen = calibrated_seen or bool(variant.calibration)
        say(
            f"[{index}/{len(conversions)}] converting {variant.name}"
            + (" (first calibrated row: decoding the calibration audio)" if first_calibrated else "")
        )
        output = Path(checkpoints_dir) / f"{base_name}-{variant.name}"
        started = time.perf_counter()
        report = convert_checkpoint(
            base_dir,
            variant.spec,
            output,
            overwrite=True,
            targets=list(variant.targets),
            calibration=list(variant.calibration) or None,
            calibration_samples=calibration_samples,
            calibration_text=variant.calibration_text,
            exclude_ids=evaluation_ids,
            progress=False,
            warn=_quiet_advice,
        )
        seconds = time.perf_counter() - started
        say(f"[{index}/{len(conversions)}] {variant.name}: {seconds:.0f} s -> {output}")
        calibration_seconds.append(report.calibration_seconds if variant.calibration else None)
        convert_seconds.append(seconds)
        model_ids.append(str(output))
        cache_bytes.append(_decoder_cache_bytes(config, report) if variant.targets == ("decoder",) else None)
        extra: dict = {}
        if variant.calibration:
            extra["calibration"] = {
                "sources": list(report.calibration_sources),
                "fit_utterances": len(report.calibration_ids),
                "held_out_utterances": len(report.held_out_ids),
            }
        sizes = _layer_sizes(report)
        if sizes:
            extra["layer_latent_dims"] = sizes
        extras.append(extra)
    say(f"evaluating {len(model_ids)} models on {', '.join(splits)}" + (f" (first {limit} each)" if limit else ""))
    payload, path = evaluate_models(
        model_ids,
        splits,
        data=data,
        batch_size=batch_size,
        limit=limit,
        device=device,
        results_dir=results_dir,
        progress=progress,
    )
    by_model = {(entry["model"], entry["split"]): entry for entry in payload["results"]}
    rows = []
    for variant, model_id, per_token, cal_seconds, conv_seconds, extra in zip(
        variants, model_ids, cache_bytes, calibration_seconds, convert_seconds, extras, strict=True
    ):
        row = {
            "variant": variant.name,
            "description": variant.description,
            "series": variant.group,
            "model": model_id,
            "decoder_cache_bytes_per_token": per_token,
            "calibration_seconds": cal_seconds,
            "convert_seconds": conv_seconds,
            **extra,
            "splits": {},
        }
        for split in splits:
            entry = by_model.get((model_id, split), {})
            row["splits"][split] = {
                key: entry.get(key)
                for key in (
                    "wer",
                    "cer",
                    "utterances",
                    "substitutions",
                    "deletions",
                    "insertions",
                    "reference_words",
                    "generation_limit_hits",
                    "wall_seconds",
                )  # fmt: skip
            }
        rows.append(row)
    return rows, path


def run_demo(
    plan: DemoPlan, *, device: str = "auto", progress: bool = True, announce: Callable[[str], None] | None = None
) -> tuple[list[dict], Path, str, float]:
    """Run a checked plan: ``(rows, evaluation JSON, notes for the report, seconds)``."""
    started = time.perf_counter()
    rows, journal = run_variants(
        plan.variants,
        base=plan.base,
        data=plan.data,
        splits=plan.splits,
        limit=plan.limit,
        batch_size=plan.batch_size,
        device=device,
        checkpoints_dir=plan.checkpoints_dir,
        results_dir=plan.output_dir / f"{DEMO_NAME}_runs",
        progress=progress,
        calibration_samples=plan.calibration_samples,
        announce=announce,
    )
    seconds = time.perf_counter() - started
    return rows, journal, demo_notes(plan, rows, journal, seconds), seconds


def demo_notes(plan: DemoPlan, rows: Sequence[dict], journal: Path, seconds: float) -> str:
    """The report's notes: the method, the calibration data actually used, the data and the run."""
    notes = DEMO_NOTES
    calibrated = next((row["calibration"] for row in rows if row.get("calibration")), None)
    if calibrated:
        total = calibrated["fit_utterances"] + calibrated["held_out_utterances"]
        notes += (
            f"Calibration audio: {', '.join(calibrated['sources'])}: {total} utterances "
            f"({calibrated['fit_utterances']} fitted, {calibrated['held_out_utterances']} held out for the budget "
            "search), decoded label-free (the model's own greedy transcripts), one pass shared by every calibrated "
            "row; checked by id to share no utterance with the evaluated splits.\n"
        )
    budgets = [row for row in rows if row.get("layer_latent_dims")]
    if budgets:
        notes += (
            "Per-layer latent sizes chosen under the budgets: "
            + "; ".join(f"{row['variant']} {'/'.join(map(str, row['layer_latent_dims']))}" for row in budgets)
            + ".\n"
        )
    limit = f", first {plan.limit} utterances of each split" if plan.limit else ""
    notes += f"Data: {plan.data}{limit}; evaluation journal `{journal}`; {seconds:.0f} s in all.\n\n"
    return notes


def _evaluation_ids(data: str | None, splits: Sequence[str]) -> list[str]:
    """Utterance ids of the evaluation data (a local root); calibration must not share any."""
    from ..data import iter_local_index, resolve_source

    source = resolve_source(data)
    if str(source) == "hub":
        return []  # Hub calibration is dev-clean, disjoint from the test splits by construction
    return [row["id"] for split in splits for row in iter_local_index(source, split)]
