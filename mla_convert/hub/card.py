"""Model cards (``README.md``) for converted models: Hub metadata in YAML, then what was done.

Everything here is pure text from dicts already read by :mod:`mla_convert.hub.plan` and
:mod:`mla_convert.hub.sources` (config, conversion report, evaluation rows, base model facts), so a
card is the same for a dry run and a push and never holds a local path or a date. This module holds
the metadata (``card_data``: tags, licence, datasets, model-index) and :func:`render_card`; the body
sections are in :mod:`.card_conversion` and :mod:`.card_sections`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..data import CORPUS_SIZES, HUB_DATASET, SPLITS
from .card_conversion import conversion_section, kv_section, layer_rows, ratio_text, role_names
from .card_inputs import (
    ATTENTION_NAMES,
    ATTENTION_TAGS,
    CardInputs,
    attention_type,
    calibration_datasets,
    conversion,
    host_name,
    pipeline_tag,
)
from .card_sections import evaluation_section, license_section, pct, training_section, usage_section

# ------------------------------------------------------------------------------------------ metadata


def parse_front_matter(text: str) -> dict:
    """The YAML block at the top of a model card (``{}`` if there is none or it does not parse)."""
    import yaml

    match = re.match(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _round(value: float) -> float:
    return round(100 * float(value), 2)


def model_index_name(repo_id: str) -> str:
    return repo_id.split("/")[-1]


def split_label(split: str, row: dict, limit: int | None) -> str:
    """``LibriSpeech test-clean``, with the share of the corpus when only part of it was scored."""
    label = f"LibriSpeech {split}"
    full = CORPUS_SIZES.get(split)
    scored = int(row.get("utterances") or 0)
    if full and (limit is not None or scored < full):
        label += f" ({scored} of {full} utterances)"
    return label


def eval_results(inputs: CardInputs) -> list:
    """model-index entries (``huggingface_hub.EvalResult``) for this model's complete LibriSpeech rows."""
    from huggingface_hub import EvalResult

    evaluation = inputs.evaluation
    results = []
    if evaluation is None:
        return results
    for row in evaluation.own_rows:
        split = row.get("split")
        if split not in SPLITS or row.get("wer") is None or row.get("complete") is False:
            continue
        config_name, hub_split = SPLITS[split]
        common = dict(
            task_type="automatic-speech-recognition",
            task_name="Automatic Speech Recognition",
            dataset_type=HUB_DATASET,
            dataset_name=split_label(split, row, evaluation.limit),
            dataset_config=config_name,
            dataset_split=hub_split,
        )
        results.append(EvalResult(metric_type="wer", metric_value=_round(row["wer"]), metric_name="WER", **common))
        if row.get("cer") is not None:
            results.append(EvalResult(metric_type="cer", metric_value=_round(row["cer"]), metric_name="CER", **common))
    return results


def card_data(inputs: CardInputs):
    """The ``huggingface_hub.ModelCardData`` of the card."""
    from huggingface_hub import ModelCardData

    config = inputs.config
    kind = attention_type(config)
    tags = ["mla-convert", *ATTENTION_TAGS.get(kind, [kind]), host_name(config, inputs.report), "custom_code"]
    if pipeline_tag(config) == "automatic-speech-recognition":
        tags.insert(1, "speech")
    datasets = list((inputs.training or {}).get("datasets") or [])
    results = eval_results(inputs)
    if results and HUB_DATASET not in datasets:
        datasets.append(HUB_DATASET)
    datasets += [name for name in calibration_datasets(inputs.report) if name not in datasets]
    base = inputs.base
    extra = {}
    if base.license_name:
        extra["license_name"] = base.license_name
    if base.license_link:
        extra["license_link"] = base.license_link
    return ModelCardData(
        language=base.language or None,
        library_name="transformers",
        base_model=base.hub_id,
        pipeline_tag=pipeline_tag(config),
        license=base.license or "other",
        datasets=datasets or None,
        tags=list(dict.fromkeys(t for t in tags if t)),
        metrics=["wer", "cer"] if results else None,
        model_name=model_index_name(inputs.repo_id) if results else None,
        eval_results=results or None,
        **extra,
    )


def render_card(inputs: CardInputs) -> str:
    """The full ``README.md``: YAML metadata between ``---`` lines, then the body."""
    config = inputs.config
    rows = layer_rows(inputs)
    host = host_name(config, inputs.report)
    kind = attention_type(config)
    name = model_index_name(inputs.repo_id)
    totals = (inputs.report or {}).get("totals") or {}
    summary = (
        f"{inputs.base.display} with its {' and '.join(role_names(rows, host))} converted to "
        f"{ATTENTION_NAMES.get(kind, kind)} by `mla_convert`"
    )
    if totals.get("state_bytes_per_frame_before"):
        before, after = int(totals["state_bytes_per_frame_before"]), int(totals.get("state_bytes_per_frame_after", 0))
        summary += (
            f": K/V state of the converted layers {before} → {after} bytes per position ({ratio_text(before, after)})"
        )
    summary += "."
    if inputs.evaluation and inputs.evaluation.own_rows:
        scores = ", ".join(
            f"{row.get('split')} {pct(row.get('wer'))}"
            for row in inputs.evaluation.own_rows
            if row.get("wer") is not None
        )
        if scores:
            summary += f" WER: {scores}."
    body = [
        f"# {name}",
        "",
        summary,
        "",
        *conversion_section(inputs, rows),
        *kv_section(inputs, rows),
        *evaluation_section(inputs),
        *training_section(inputs.training, conversion(config).get("spec")),
        *usage_section(inputs),
        *license_section(inputs.base),
    ]
    metadata = card_data(inputs).to_yaml()
    return f"---\n{metadata}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def read_card(path: str | Path) -> dict:
    """Front matter of a card file; ``{}`` when the file is missing or has none."""
    try:
        return parse_front_matter(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}
