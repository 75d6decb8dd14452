"""The model card's sections after the conversion: evaluation, fine-tuning, how to load, licence."""

from __future__ import annotations

import importlib.metadata

from ..data import CORPUS_SIZES, HUB_DATASET
from .card_inputs import BaseModelInfo, CardInputs, auto_class, pipeline_tag


def evaluation_section(inputs: CardInputs) -> list[str]:
    evaluation = inputs.evaluation
    lines = ["## Evaluation", ""]
    if evaluation is None or not (evaluation.own_rows or evaluation.other_rows):
        return lines + ["Not evaluated yet (no evaluation JSON was given).", ""]
    source = (
        f"LibriSpeech streamed from the Hub ([{HUB_DATASET}](https://huggingface.co/datasets/{HUB_DATASET}))"
        if evaluation.data == "hub"
        else "a local copy of LibriSpeech (official layout)"
    )
    scope = f"the first {evaluation.limit} utterances of each split" if evaluation.limit else "each split"
    lines += [
        f"Measured with `mla-convert evaluate` on {source}, {scope}: greedy decoding, word and character error "
        "rates after text normalisation (Whisper's English normaliser for seq2seq models, LibriSpeech style for "
        "CTC) on both reference and hypothesis. K/V bytes per position cover every attention layer of the model.",
        "",
        "| model | split | WER | CER | utterances | K/V bytes per position |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = [("**this model**", row) for row in evaluation.own_rows] + list(evaluation.other_rows)
    for label, row in rows:
        kv = row.get("kv_state_bytes_per_frame")
        if kv is None:
            kv = row.get("kv_state_bytes_per_frame_mha")
        utterances = str(row.get("utterances", "-")) + ("" if row.get("complete", True) else " (incomplete)")
        lines.append(
            f"| {label} | {row.get('split')} | {pct(row.get('wer'))} | {pct(row.get('cer'))} | {utterances} | "
            f"{'-' if kv is None else kv} |"
        )
    lines.append("")
    if evaluation.limit or any(
        int(row.get("utterances") or 0) < CORPUS_SIZES.get(str(row.get("split")), 0) for _, row in rows
    ):
        lines += ["These are partial test sets: compare rows with each other, not with published full-set WERs.", ""]
    if not evaluation.own_rows:
        lines += ["The evaluation JSON has no rows for this model itself; the rows above are for comparison.", ""]
    return lines


def pct(value) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"


# run-local details of finetune_summary.json that mean nothing on the Hub
TRAINING_KEYS_NOT_IN_CARD = {"model", "output", "best_checkpoint", "planned_steps", "shared_encoder"}


def training_section(training: dict | None, spec: dict | None = None) -> list[str]:
    lines = ["## Fine-tuning", ""]
    if not training:
        fitted = ""
        if (spec or {}).get("feature_map") == "hedgehog":
            fitted = " (only the Hedgehog feature maps were fitted, to each layer's softmax attention weights)"
        return lines + [
            "None. No end-to-end training after the conversion: the converted layers are seeded from the base "
            f"model's trained weights as described above{fitted}, and everything else is the base model's. Expect "
            "some accuracy loss against the base model, larger the more the K/V state shrinks.",
            "",
        ]
    datasets = training.get("datasets") or []
    if datasets:
        lines.append("- **Data**: " + ", ".join(f"`{name}`" for name in datasets))
    for key in ("steps", "epochs", "learning_rate", "batch_size"):
        if training.get(key) is not None:
            lines.append(f"- **{key.replace('_', ' ').capitalize()}**: {training[key]}")
    shown = {"datasets", "steps", "epochs", "learning_rate", "batch_size"}
    for key, value in training.items():
        if key not in shown | TRAINING_KEYS_NOT_IN_CARD and not isinstance(value, dict | list):
            lines.append(f"- **{key.replace('_', ' ')}**: {value}")
    return lines + [""]


def tested_transformers_range() -> str | None:
    """The ``transformers`` requirement of the installed mla_convert (e.g. ``<6,>=5.0``), read from its
    package metadata when the card is written; ``None`` if mla_convert is not installed as a package."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requirements = importlib.metadata.requires("mla_convert") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.name.lower() == "transformers" and requirement.marker is None:
            bounds = sorted((str(bound) for bound in requirement.specifier), key=lambda bound: bound[0] != ">")
            return ",".join(bounds) or None
    return None


def _transformers_text(config: dict) -> str:
    version = config.get("transformers_version")
    saved = f", saved with {version}" if version else ""
    tested = tested_transformers_range()
    if tested:
        return f"Plain `transformers` (tested with `transformers{tested}`{saved})"
    major = str(version).split(".")[0] if version else "5"
    return f"Plain `transformers` (>= {major}.0{saved})"


def usage_section(
    inputs: CardInputs, code: str = "The converted attention is remote code in this repository"
) -> list[str]:
    auto = auto_class(inputs.config)
    repo = inputs.repo_id
    lines = [
        "## How to load",
        "",
        f"{_transformers_text(inputs.config)}; "
        "mla_convert is not needed. "
        f"{code} "
        f"({', '.join(f'`{name}`' for name in inputs.files if name.endswith('.py'))}), so loading needs "
        '`trust_remote_code=True`: read those files first, and pass `revision="<commit>"` to pin them.',
        "",
        "```python",
    ]
    has_processor = any(name in inputs.files for name in ("preprocessor_config.json", "processor_config.json"))
    # a feature extractor of its own (mla_convert's Conformer front end) is remote code too
    remote_extractor = any(name.startswith("feature_extraction_") and name.endswith(".py") for name in inputs.files)
    processor_options = ", trust_remote_code=True" if remote_extractor else ""
    if pipeline_tag(inputs.config) == "automatic-speech-recognition" and has_processor:
        lines += [
            f"from transformers import {auto}, AutoProcessor, pipeline",
            "",
            f'model = {auto}.from_pretrained("{repo}", trust_remote_code=True)',
            f'processor = AutoProcessor.from_pretrained("{repo}"{processor_options})',
            "",
            f'asr = pipeline("automatic-speech-recognition", model="{repo}", trust_remote_code=True)',
            'print(asr("audio.flac")["text"])',
        ]
    else:
        lines += [
            f"from transformers import {auto}",
            "",
            f'model = {auto}.from_pretrained("{repo}", trust_remote_code=True)',
        ]
    lines += ["```", ""]
    if not has_processor:
        lines += [
            "This repository has no processor files: take the feature extractor and tokenizer from the base model.",
            "",
        ]
    return lines


def license_section(base: BaseModelInfo) -> list[str]:
    lines = ["## License", ""]
    if base.license and base.license != "other":
        if base.license_origin == "card":
            where = "from its model card"
        elif base.license_origin == "known":
            where = base.license_note or "as released"
        else:
            where = "given with the converter's `--license`: the base model's card could not be read here"
        lines.append(f"Inherited from the base model {base.display}: `{base.license}` ({where}).")
    elif base.license == "other" and base.license_name:
        link = f" ({base.license_link})" if base.license_link else ""
        lines.append(f"Inherited from the base model {base.display}: `{base.license_name}`{link}.")
    else:
        lines.append(
            f"This model inherits the licence of its base model {base.display}, whose card could not be read "
            "here (and no `--license` was given): read the base model's card before using or redistributing it."
        )
    return lines + [""]
