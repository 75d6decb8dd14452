"""Model cards (``README.md``) for converted models: Hub metadata in YAML, then what was done.

Everything here is pure text from dicts already read by :mod:`mla_convert.hub` (config, conversion
report, evaluation rows, base model facts), so a card is the same for a dry run and a push and
never holds a local path or a date.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data import CORPUS_SIZES, HUB_DATASET, SPLITS

ASR_HEADS = {"AutoModelForCTC", "AutoModelForSpeechSeq2Seq"}
AUTO_CLASS_TASKS = {  # auto_map key -> pipeline tag of the Hub
    "AutoModelForCTC": "automatic-speech-recognition",
    "AutoModelForSpeechSeq2Seq": "automatic-speech-recognition",
    "AutoModelForAudioClassification": "audio-classification",
    "AutoModelForAudioFrameClassification": "audio-classification",
    "AutoModelForAudioXVector": "audio-classification",
    "AutoModel": "feature-extraction",
}
ATTENTION_TAGS = {
    "mla": ["mla", "multi-head-latent-attention"],
    "gqa": ["gqa", "grouped-query-attention"],
    "linear": ["linear-attention"],
}
ATTENTION_NAMES = {
    "mla": "multi-head latent attention (MLA)",
    "gqa": "grouped-query attention (GQA)",
    "linear": "linear attention",
}
ROLE_NAMES = {"encoder": "encoder self-attention", "decoder": "decoder self-attention", "cross": "cross-attention"}
# Calibration utterance ids -> the Hub dataset they come from (the card never names a local path).
ID_DATASETS = ((re.compile(r"^\d+-\d+-\d+$"), HUB_DATASET), (re.compile(r"^LJ\d{3}-\d{4}$"), "keithito/lj_speech"))
DATASET_NAMES = {HUB_DATASET: "LibriSpeech", "keithito/lj_speech": "LJ Speech"}
# Variants whose K/V projections are the trained ones: a K/V error is not defined for them.
NO_KV_ERROR = {"linear"}


@dataclass
class BaseModelInfo:
    """What is known of the model that was converted."""

    hub_id: str | None = None  # goes into ``base_model:``; only a Hub id, never a path
    label: str | None = None  # how the text names it when there is no Hub id
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    license_origin: str | None = None  # "card" (the base model's card), "known" (license_note) or "option" (--license)
    license_note: str | None = None  # where a "known" licence comes from
    language: list[str] | None = None  # ISO codes, from the base model's card or what is known of it
    note: str | None = None  # how the converted weights relate to the Hub model, when not plainly

    @property
    def display(self) -> str:
        if self.hub_id:
            return f"[{self.hub_id}](https://huggingface.co/{self.hub_id})"
        return f"`{self.label}`" if self.label else "an unrecorded base model"


@dataclass
class EvaluationInfo:
    """Rows of an ``evaluate_models`` JSON: this model's (they go into model-index) and the rest."""

    own_rows: list[dict]
    other_rows: list[tuple[str, dict]] = field(default_factory=list)  # (display label, row)
    data: str | None = None  # "hub" or a local root (only "hub" is named in the card)
    limit: int | None = None
    file_name: str | None = None


@dataclass
class CardInputs:
    repo_id: str
    config: dict
    report: dict | None
    files: list[str]
    base: BaseModelInfo = field(default_factory=BaseModelInfo)
    evaluation: EvaluationInfo | None = None
    training: dict | None = None


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


def conversion(config: dict) -> dict:
    value = config.get("attention_conversion")
    return value if isinstance(value, dict) else {}


def attention_type(config: dict) -> str:
    return str(conversion(config).get("spec", {}).get("attention", "unknown"))


def host_name(config: dict, report: dict | None) -> str:
    name = (report or {}).get("model_type") or conversion(config).get("host") or config.get("model_type", "")
    return str(name).replace("_", "-")


def auto_class(config: dict) -> str:
    """The Auto class a user loads the model with (the task head saved in ``auto_map``)."""
    keys = list((config.get("auto_map") or {}).keys())
    for key in (*ASR_HEADS, *AUTO_CLASS_TASKS):
        if key in keys:
            return key
    return "AutoModel"


def pipeline_tag(config: dict) -> str | None:
    return AUTO_CLASS_TASKS.get(auto_class(config))


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


# ------------------------------------------------------------------------------------------------ body


def _latent_size(spec: dict, config: dict) -> str:
    """``a 96-value latent``, or the per-layer sizes a cache budget chose."""
    if spec.get("latent_dim"):
        return f"a {spec['latent_dim']}-value latent"
    sizes = [layer.get("latent_dim") for layer in (conversion(config).get("layers") or {}).values()]
    sizes = [str(size) for size in sizes if size]
    budget = spec.get("cache_budget")
    chosen = f" ({'/'.join(sizes)} values per layer)" if sizes else ""
    return f"a latent sized per layer by a cache budget of {budget} of the original K/V values{chosen}"


def _calibrated_mla_text(spec: dict) -> str:
    objective = spec.get("objective", "attention")
    if objective == "attention":
        fitted = (
            "the attention objective: each key head weighted by the queries that read it and each value head "
            "by its slice of the output projection, so the latent keeps what reaches the scores and the output"
        )
    else:
        fitted = "the K/V objective: K and V themselves"
    balance = ", K balanced against V" if spec.get("balance_kv", True) else ""
    damping = spec.get("damping", 1e-4)
    return (
        "seeded by a whitened (activation-calibrated) SVD of the stacked trained `[W_k; W_v]`: the layer inputs of "
        f"the calibration audio whiten it (Cholesky factor of their covariance, damping {damping}){balance}, "
        f"fitted with {fitted}"
    )


def _calibrated_gqa_text(config: dict) -> str:
    grouping = "heads grouped by how alike their keys and values are on the calibration audio"
    if config.get("position_embeddings_type") in ("relative", "rotary"):
        return (
            f"{grouping}; each group's K and V projections merged by weighted least squares on the calibration "
            "inputs (keys weighted by the queries that read them, values by the output projection)"
        )
    return (
        f"{grouping}; each group shares one key and one value subspace fitted on the calibration inputs, and each "
        "query head and output-projection slice absorbs its own map into that subspace (exact at full size)"
    )


def _spec_text(spec: dict, config: dict) -> str:
    kind = spec.get("attention")
    init = spec.get("init")
    if kind == "mla":
        latent = spec.get("latent_dim")
        if init == "svd-split":
            return (
                f"{ATTENTION_NAMES['mla']}: each position stores a {latent}-value latent, split into separate K and "
                f"V latents of {int(latent) // 2} values, each seeded by a truncated SVD of the trained `W_k` / `W_v`"
            )
        seeding = (
            _calibrated_mla_text(spec)
            if init == "calibrated"
            else "seeded by a truncated SVD of the stacked trained `[W_k; W_v]` (plain SVD, no calibration)"
        )
        return (
            f"{ATTENTION_NAMES['mla']}: each position stores {_latent_size(spec, config)} `c = W_down x` shared by "
            f"K and V (`K = W_uk c`, `V = W_uv c`), {seeding}"
        )
    if kind == "gqa":
        seeding = (
            _calibrated_gqa_text(config)
            if init == "calibrated"
            else "each seeded by the mean of the trained K/V heads of its group (mean-pool, no calibration)"
        )
        return f"{ATTENTION_NAMES['gqa']} with {spec.get('kv_heads')} key/value heads: {seeding}"
    if kind == "linear":
        feature_map = spec.get("feature_map", "elu")
        if feature_map == "hedgehog":
            phi = "a learnable (Hedgehog) map, fitted to the softmax attention on calibration audio"
        else:
            phi = "φ(x) = elu(x)+1" if feature_map == "elu" else f"φ = {feature_map}"
        return (
            f"{ATTENTION_NAMES['linear']} with feature map {phi}: no per-position K/V state, a fixed "
            "running sum per head; the trained projections are kept"
        )
    return f"attention spec `{spec}`"


def calibration_datasets(report: dict | None) -> list[str]:
    """Hub datasets the calibration utterances came from, recognised by their ids."""
    ids = [*((report or {}).get("calibration_ids") or []), *((report or {}).get("held_out_ids") or [])]
    found = []
    for pattern, dataset in ID_DATASETS:
        if any(pattern.match(str(utterance)) for utterance in ids):
            found.append(dataset)
    return found


def _source_text(source: str) -> str:
    if source == "hub":
        return f"LibriSpeech dev-clean streamed from the Hub ([{HUB_DATASET}](https://huggingface.co/datasets/{HUB_DATASET}))"
    name = Path(str(source)).name or str(source)
    return f"a local folder `{name}`"


def _calibration_lines(report: dict) -> list[str]:
    """What the calibration data was: sources and utterance counts (from ``conversion_report.json``)."""
    fit = [str(utterance) for utterance in report.get("calibration_ids") or []]
    held_out = [str(utterance) for utterance in report.get("held_out_ids") or []]
    if not fit and not held_out:
        if report.get("calibration_batches"):
            return [f"- **Calibration**: K/V errors also measured on {report['calibration_batches']} batches of audio."]
        return []
    counts = []
    everything = fit + held_out
    for pattern, dataset in ID_DATASETS:
        matched = sum(1 for utterance in everything if pattern.match(utterance))
        if matched:
            counts.append(f"{matched} {DATASET_NAMES[dataset]}")
    known = sum(1 for utterance in everything if any(pattern.match(utterance) for pattern, _ in ID_DATASETS))
    if len(everything) > known:
        counts.append(f"{len(everything) - known} other")
    sources = ", ".join(_source_text(source) for source in report.get("calibration_sources") or []) or "unrecorded"
    decoder = (
        "teacher-forced on the reference transcripts"
        if report.get("calibration_text")
        else "the model's own greedy transcripts (label-free)"
    )
    return [
        f"- **Calibration data**: {len(everything)} utterances ({', '.join(counts)}) from {sources}: {len(fit)} "
        f"fitted the conversion, {len(held_out)} were held out for the activation errors below; decoder "
        f"inputs were {decoder}. None of them is a test utterance (checked by id)."
    ]


def _layer_rows(inputs: CardInputs) -> list[dict]:
    if inputs.report and inputs.report.get("layers"):
        return list(inputs.report["layers"])
    rows = []
    for path, layer in (conversion(inputs.config).get("layers") or {}).items():
        role = "cross" if "encoder_attn" in path else path.split(".", 1)[0]
        rows.append({"path": path, "role": role, "attention": layer.get("attention")})
    return rows


def _fmt_error(value, defined: bool = True) -> str:
    """``n/a`` where a K/V error is not defined (linear attention keeps the trained K/V), ``-`` if unmeasured."""
    if not defined:
        return "n/a"
    return "-" if value is None else f"{float(value):.4f}"


def _roles(rows: list[dict], host: str) -> list[str]:
    roles = list(dict.fromkeys(str(row.get("role", "")) for row in rows))
    if host != "whisper":
        return ["self-attention"]
    return [ROLE_NAMES.get(role, role) for role in roles]


def _ratio_text(before: int, after: int) -> str:
    if not before:
        return ""
    if not after:
        return "no per-position state left"
    return f"{100 * after / before:.1f}% of the original, {before / after:.1f}× smaller"


def _kv_section(inputs: CardInputs, rows: list[dict]) -> list[str]:
    report = inputs.report or {}
    totals = report.get("totals") or {}
    dtype = report.get("dtype") or inputs.config.get("dtype") or inputs.config.get("torch_dtype") or "float32"
    lines = ["## K/V-state size", ""]
    if not totals:
        totals = _totals_from_config(inputs.config)
    if not totals:
        lines += ["Not recorded (no `conversion_report.json` beside the weights).", ""]
        return lines
    before = int(totals.get("state_bytes_per_frame_before", 0))
    after = int(totals.get("state_bytes_per_frame_after", 0))
    lines += [
        f"Bytes of key/value state each position (audio frame for encoder layers, token for decoder layers) "
        f"adds to the cache, summed over the {totals.get('converted_layers', len(rows))} converted layers, "
        f"in {dtype} (half of it in float16):",
        "",
        "| attention | before | after | change |",
        "|---|---:|---:|---|",
    ]
    by_role: dict[str, list[int]] = {}
    for row in rows:
        sums = by_role.setdefault(str(row.get("role", "")), [0, 0])
        sums[0] += int(row.get("state_bytes_per_frame_before") or 0)
        sums[1] += int(row.get("state_bytes_per_frame_after") or 0)
    host = host_name(inputs.config, inputs.report)
    if len(by_role) > 1:
        for role, (role_before, role_after) in by_role.items():
            name = ROLE_NAMES.get(role, role) if host == "whisper" else role
            lines.append(f"| {name} | {role_before} B | {role_after} B | {_ratio_text(role_before, role_after)} |")
    lines.append(f"| **all converted layers** | {before} B | {after} B | {_ratio_text(before, after)} |")
    fixed = int(totals.get("fixed_state_bytes_after") or 0)
    if fixed:
        lines += ["", f"Linear attention keeps instead a fixed {fixed} bytes per sequence (its running sums)."]
    lines.append("")
    return lines


def _totals_from_config(config: dict) -> dict:
    """Without a conversion report: the K/V-state totals of the converted layers (float32) by the
    evaluator's own per-variant formula, :func:`mla_convert.evaluate.attention_report`."""
    layers = conversion(config).get("layers") or {}
    hidden = int(config.get("d_model") or config.get("hidden_size") or 0)
    if not layers or not hidden:
        return {}
    from types import SimpleNamespace

    from .evaluate import attention_report

    report = attention_report(SimpleNamespace(**config))
    if report.get("kv_state_bytes_per_frame") is None:
        return {}
    before = 2 * hidden * 4 * len(layers)  # unconverted: K and V, hidden values each
    unconverted = int(report["kv_state_bytes_per_frame_mha"]) - before
    return {
        "converted_layers": len(layers),
        "state_bytes_per_frame_before": before,
        "state_bytes_per_frame_after": int(report["kv_state_bytes_per_frame"]) - unconverted,
    }


def _conversion_section(inputs: CardInputs, rows: list[dict]) -> list[str]:
    info = conversion(inputs.config)
    spec = info.get("spec") or (inputs.report or {}).get("spec") or {}
    report = inputs.report or {}
    host = host_name(inputs.config, inputs.report)
    lines = [
        "## What was converted",
        "",
        f"- **Base model**: {inputs.base.display} ({host}){f', {inputs.base.note}' if inputs.base.note else ''}",
        f"- **Attention**: {_spec_text(spec, inputs.config)}.",
        f"- **Spec**: `{_inline(spec)}`",
        f"- **Layers**: {len(rows)} converted ({', '.join(_roles(rows, host))}); everything else is the base model's.",
        f"- **Converted with**: `{info.get('toolkit', 'mla_convert')}`, weights in {report.get('dtype', 'float32')}.",
    ]
    lines += _calibration_lines(report)
    for note in dict.fromkeys([*(info.get("approximations") or []), *(report.get("approximations") or [])]):
        lines.append(f"- **Approximation**: {note}")
    with_weights = any("k_weight_error" in row for row in rows)
    with_activations = any(row.get("k_activation_error") is not None for row in rows)
    lines.append("")
    if with_weights:
        lines.append(
            "Per layer: relative Frobenius error of the effective K and V projections against the original "
            "ones" + (" (and of K/V on calibration audio)" if with_activations else "") + ", and K/V-state "
            "bytes per position before and after."
        )
        lines.append("")
        header = ["layer", "role", "attention", "K error", "V error"]
        if with_activations:
            header += ["K error (audio)", "V error (audio)"]
        header += ["bytes before", "bytes after"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * 3 + "---:|" * (len(header) - 3))
        for row in rows:
            defined = row.get("attention") not in NO_KV_ERROR
            cells = [
                f"`{row.get('path')}`",
                str(row.get("role", "")),
                str(row.get("attention", "")),
                _fmt_error(row.get("k_weight_error"), defined),
                _fmt_error(row.get("v_weight_error"), defined),
            ]
            if with_activations:
                cells += [
                    _fmt_error(row.get("k_activation_error"), defined),
                    _fmt_error(row.get("v_activation_error"), defined),
                ]
            cells += [
                str(row.get("state_bytes_per_frame_before", "-")),
                str(row.get("state_bytes_per_frame_after", "-")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines += ["Converted layers: " + ", ".join(f"`{row['path']}`" for row in rows)]
    lines.append("")
    return lines


def _inline(value: dict) -> str:
    return ", ".join(f"{key}={value[key]}" for key in value)


def _evaluation_section(inputs: CardInputs) -> list[str]:
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
            f"| {label} | {row.get('split')} | {_pct(row.get('wer'))} | {_pct(row.get('cer'))} | {utterances} | "
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


def _pct(value) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"


# run-local details of finetune_summary.json that mean nothing on the Hub
TRAINING_KEYS_NOT_IN_CARD = {"model", "output", "best_checkpoint", "planned_steps", "shared_encoder"}


def _training_section(training: dict | None) -> list[str]:
    lines = ["## Fine-tuning", ""]
    if not training:
        return lines + [
            "None. No weight was trained after the conversion: the new attention is seeded from the base model's "
            "trained key/value projections, and everything else is the base model's. Expect some accuracy loss "
            "against the base model, larger at smaller K/V states.",
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


def _usage_section(inputs: CardInputs) -> list[str]:
    auto = auto_class(inputs.config)
    repo = inputs.repo_id
    lines = [
        "## How to load",
        "",
        f"{_transformers_text(inputs.config)}; "
        "mla_convert is not needed. "
        "The converted attention is remote code in this repository "
        f"({', '.join(f'`{name}`' for name in inputs.files if name.endswith('.py'))}), so loading needs "
        '`trust_remote_code=True`: read those files first, and pass `revision="<commit>"` to pin them.',
        "",
        "```python",
    ]
    has_processor = any(name in inputs.files for name in ("preprocessor_config.json", "processor_config.json"))
    if pipeline_tag(inputs.config) == "automatic-speech-recognition" and has_processor:
        lines += [
            f"from transformers import {auto}, AutoProcessor, pipeline",
            "",
            f'model = {auto}.from_pretrained("{repo}", trust_remote_code=True)',
            f'processor = AutoProcessor.from_pretrained("{repo}")',
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


def _license_section(base: BaseModelInfo) -> list[str]:
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


def render_card(inputs: CardInputs) -> str:
    """The full ``README.md``: YAML metadata between ``---`` lines, then the body."""
    config = inputs.config
    rows = _layer_rows(inputs)
    host = host_name(config, inputs.report)
    kind = attention_type(config)
    name = model_index_name(inputs.repo_id)
    totals = (inputs.report or {}).get("totals") or {}
    summary = (
        f"{inputs.base.display} with its {' and '.join(_roles(rows, host))} converted to "
        f"{ATTENTION_NAMES.get(kind, kind)} by `mla_convert`"
    )
    if totals.get("state_bytes_per_frame_before"):
        before, after = int(totals["state_bytes_per_frame_before"]), int(totals.get("state_bytes_per_frame_after", 0))
        summary += (
            f": K/V state of the converted layers {before} → {after} bytes per position ({_ratio_text(before, after)})"
        )
    summary += "."
    if inputs.evaluation and inputs.evaluation.own_rows:
        scores = ", ".join(
            f"{row.get('split')} {_pct(row.get('wer'))}"
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
        *_conversion_section(inputs, rows),
        *_kv_section(inputs, rows),
        *_evaluation_section(inputs),
        *_training_section(inputs.training),
        *_usage_section(inputs),
        *_license_section(inputs.base),
    ]
    metadata = card_data(inputs).to_yaml()
    return f"---\n{metadata}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def read_card(path: str | Path) -> dict:
    """Front matter of a card file; ``{}`` when the file is missing or has none."""
    try:
        return parse_front_matter(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}
