"""Model cards for mla_convert's own Conformer / Branchformer CTC models that were trained, not converted.

Such a model is recognised from its ``config.json`` (:func:`is_own_model`: the ``model_type`` of
:class:`~mla_convert.modeling.configuration_conformer.ConformerConfig` or
:class:`~mla_convert.modeling.configuration_branchformer.BranchformerConfig`, an ``auto_map`` and an
``attention``, and no ``attention_conversion``). Its card says what the model is (an architecture
table from the config), its K/V state per frame (:func:`mla_convert.evaluation.kv_state.attention_report`)
against multi-head attention, how it was trained (``finetune_summary.json``, else ``train_result.json``)
and, from :mod:`.card` and :mod:`.card_sections`, the metadata, evaluation, usage and licence. Like the
conversion card it never names a local path: a local data folder appears by its last name only.
:func:`trained_facts` reads what the card needs besides the config (the training record, an ESPnet
import record, the parameter count from the safetensors headers).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import HUB_DATASET
from ..errors import first_line
from .access import PushSourceError
from .card import card_data, model_index_name
from .card_inputs import ATTENTION_TAGS, CardInputs
from .card_sections import evaluation_section, license_section, pct, usage_section
from .sources import _looks_like_hub_id

# What `mla-convert finetune` / `mla-convert train` write into the model directory
# (mla_convert.finetuning.config.SUMMARY_FILE and TRAINED_FILE; tests check they agree).
TRAINING_SUMMARY = "finetune_summary.json"
TRAINING_RESULT = "train_result.json"
ESPNET_IMPORT = "espnet_import.json"  # written by the ESPnet importer: where the weights came from
ESPNET_HUB_KEYS = ("hub_id", "base_model", "repo_id", "model", "source")  # the first that is a Hub id
# tensors in a state dict that are statistics, not parameters (BatchNorm of the convolution module)
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
TINY_TRAINING = 1000  # fewer training utterances than this: the card says the model is a demonstration
POSITIONS = {
    "rel_pos": "relative (ESPnet's latest `RelPositionalEncoding`, with `pos_bias_u` / `pos_bias_v`)",
    "rotary": "rotary (RoPE on queries and keys, base {base:g})",
    "abs_pos": "absolute sinusoidal, added after the subsampling",
}
MERGE_METHODS = {
    "concat": "concatenation of both branches, then a linear layer",
    "learned_ave": "learned weighted average (weights from attention pooling of each branch)",
    "fixed_ave": "fixed average (cgMLP weight {weight:g})",
}


@dataclass
class TrainedFacts:
    """What the trained card needs besides the config and the evaluation."""

    training: dict | None = None  # finetune_summary.json (or train_result.json)
    espnet: dict | None = None  # espnet_import.json, when the weights were imported from ESPnet
    parameters: int | None = None  # from the safetensors headers

    @property
    def espnet_hub_id(self) -> str | None:
        """The Hub id the ESPnet weights came from (never a local path)."""
        for key in ESPNET_HUB_KEYS:
            value = (self.espnet or {}).get(key)
            if isinstance(value, str) and "/" in value and _looks_like_hub_id(value):
                return value
        return None


# ---------------------------------------------------------------------------------------- recognising


def _config_classes() -> dict[str, type]:
    """``model_type`` -> config class of mla_convert's own model families (imports transformers)."""
    from ..modeling.configuration_branchformer import BranchformerConfig
    from ..modeling.configuration_conformer import ConformerConfig

    return {ConformerConfig.model_type: ConformerConfig, BranchformerConfig.model_type: BranchformerConfig}


def own_families() -> dict[str, str]:
    """``model_type`` -> family name (``Conformer``, ``Branchformer``) of mla_convert's own models."""
    return {model_type: cls.__name__.removesuffix("Config") for model_type, cls in _config_classes().items()}


def is_own_model(config: dict) -> bool:
    """Whether ``config`` (a ``config.json`` dict) is one of mla_convert's own Conformer / Branchformer
    models: its ``model_type``, saved with ``auto_map`` (the remote code) and ``attention``."""
    if not (config.get("auto_map") and config.get("attention")):
        return False  # checked first: a foreign model is refused without importing transformers
    return config.get("model_type") in own_families()


def attention_summary(config: dict) -> str:
    """``mla (latent_dim=32, latent_layout=joint)``: the attention an own model was built with."""
    attention = config["attention"] if isinstance(config["attention"], dict) else {"type": config["attention"]}
    settings = ", ".join(f"{key}={value}" for key, value in attention.items() if key != "type")
    kind = str(attention.get("type", "mha"))
    return f"{kind} ({settings})" if settings else kind


def own_config(config: dict):
    """The config object of an own model (its values checked, every default filled in)."""
    try:
        return _config_classes()[config["model_type"]].from_dict(config)
    except ValueError as error:
        raise PushSourceError(
            f"config.json does not build a {config['model_type']} model: {first_line(error)}"
        ) from None


# ------------------------------------------------------------------------------------- reading the directory


def _read_optional(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PushSourceError(f"cannot read {path}: {first_line(error)}") from None
    return data if isinstance(data, dict) else None


def trained_facts(model_dir: Path, training: dict | None = None) -> TrainedFacts:
    """The training record (``training``, else ``finetune_summary.json``, else ``train_result.json``)
    and the ESPnet import record of ``model_dir``."""
    if training is None:
        training = _read_optional(model_dir / TRAINING_SUMMARY) or _read_optional(model_dir / TRAINING_RESULT)
    return TrainedFacts(training=training, espnet=_read_optional(model_dir / ESPNET_IMPORT))


def parameter_count(files: dict[str, Path]) -> int | None:
    """Parameters of every ``*.safetensors`` file, from the shapes in their headers (no tensor is read);
    BatchNorm statistics are buffers, not parameters, and are left out."""
    total, found = 0, False
    for name in sorted(name for name in files if name.endswith(".safetensors")):
        try:
            with files[name].open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for key, info in header.items():
            if key != "__metadata__" and not key.endswith(BUFFER_SUFFIXES):
                total += math.prod(int(dim) for dim in info.get("shape", []))
                found = True
    return total if found else None


# ------------------------------------------------------------------------------------------ the text


def attention_text(attention: dict) -> str:
    """``multi-head latent attention (MLA), latent 64 per layer shared by K and V`` and so on."""
    kind = attention.get("type")
    if kind == "mla":
        latent = attention.get("latent_dim")
        if attention.get("latent_layout") == "split":
            halves = f"separate K and V latents of {latent // 2}"
            return f"multi-head latent attention (MLA), latent {latent} per layer ({halves})"
        return f"multi-head latent attention (MLA), latent {latent} per layer shared by K and V"
    if kind == "gqa":
        return f"grouped-query attention (GQA), {attention.get('kv_heads')} key/value heads"
    if kind == "linear":
        return f"linear attention (feature map {attention.get('feature_map')})"
    return "multi-head attention (MHA)"


def _source_text(source: str) -> str:
    """A training source: a Hub split, or a local folder by its last name only."""
    if source == "hub" or source.startswith("hub:"):
        split = source.partition(":")[2] or "train"
        return f"LibriSpeech {split} streamed from the Hub ([{HUB_DATASET}](https://huggingface.co/datasets/{HUB_DATASET}))"
    return f"a local folder `{Path(source).name or source}`"


def _hub_sources(training: dict | None) -> list[str]:
    return [str(s) for s in (training or {}).get("datasets") or [] if str(s) == "hub" or str(s).startswith("hub:")]


def architecture_section(config, facts: TrainedFacts) -> list[str]:
    from ..modeling.configuration_conformer import SUBSAMPLING_FACTORS

    family = own_families()[config.model_type]
    head = config.hidden_size // config.num_attention_heads
    rows = [
        ("family", f"{family} (ESPnet2 `{family}Encoder` layout) with a CTC head"),
        ("layers", str(config.num_hidden_layers)),
        ("hidden size", str(config.hidden_size)),
        ("attention heads", f"{config.num_attention_heads} (head size {head})"),
    ]
    if family == "Conformer":
        macaron = ", macaron style (two half-step feed-forwards)" if config.macaron_style else ""
        rows.append(("feed-forward", f"{config.intermediate_size} units, {config.hidden_act}{macaron}"))
        if config.use_cnn_module:
            rows.append(("convolution module", f"depthwise kernel {config.conv_kernel_size}"))
    else:
        after = ", linear after the convolution" if config.use_linear_after_conv else ""
        rows.append(
            (
                "cgMLP branch",
                f"{config.cgmlp_linear_units} units, convolution kernel {config.cgmlp_conv_kernel}, "
                f"gate activation {config.gate_activation}{after}",
            )
        )
        rows.append(("branch merge", MERGE_METHODS[config.merge_method].format(weight=config.cgmlp_weight)))
    positions = POSITIONS[config.position_embedding].format(base=config.rotary_embedding_base)
    settings = ", ".join(f"{key}={value}" for key, value in config.attention.items() if key != "type")
    rows += [
        ("positions", positions),
        ("subsampling", f"`{config.subsampling}` (×{SUBSAMPLING_FACTORS[config.subsampling]} in time)"),
        ("attention", attention_text(config.attention) + (f" (`{settings}`)" if settings else "")),
        ("input", f"{config.input_dim} log-mel features per 10 ms frame, globally normalised"),
        ("vocabulary", f"{config.vocab_size} tokens (id {config.pad_token_id} the CTC blank)"),
    ]
    if facts.parameters:
        rows.append(("parameters", f"{facts.parameters:,}"))
    lines = ["## Architecture", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return lines + [""]


def kv_report(config) -> dict:
    """:func:`~mla_convert.evaluation.kv_state.attention_report` in the model's saved dtype."""
    import torch

    from ..evaluation.kv_state import attention_report

    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    return {**attention_report(config, dtype=dtype), "dtype": str(dtype).removeprefix("torch.")}


def kv_section(config, report: dict) -> list[str]:
    from ..modeling.configuration_conformer import SUBSAMPLING_FACTORS

    own, mha = int(report["kv_state_bytes_per_frame"]), int(report["kv_state_bytes_per_frame_mha"])
    layers = config.num_hidden_layers
    factor = SUBSAMPLING_FACTORS[config.subsampling]
    lines = [
        "## K/V-state size",
        "",
        f"Bytes of key/value state each encoder frame (one position after the ×{factor} subsampling, "
        f"{10 * factor} ms of audio) adds to the attention cache, summed over the {layers} layers, "
        f"in {report['dtype']} (half of it in float16), as `mla-convert evaluate` reports them:",
        "",
        "| attention | bytes per frame | per layer | change |",
        "|---|---:|---:|---|",
        f"| **this model**: {attention_text(config.attention)} | {own} B | {own // layers} B | "
        f"{versus_mha(own, mha) if own != mha else '-'} |",
    ]
    if own != mha:
        lines.append(f"| multi-head attention of the same size | {mha} B | {mha // layers} B | - |")
    if config.attention.get("type") == "linear":
        lines += [
            "",
            "Linear attention keeps instead a fixed running sum per head and sequence (`Σ φ(k)vᵀ`, `Σ φ(k)`).",
        ]
    return lines + [""]


def versus_mha(own: int, mha: int) -> str:
    """``25.0% of multi-head attention's 1024 B, 4.0× smaller``."""
    if own == mha:
        return "the full keys and values of multi-head attention"
    if not own:
        return f"none per frame, against {mha} B for multi-head attention"
    return f"{100 * own / mha:.1f}% of multi-head attention's {mha} B, {mha / own:.1f}× smaller"


def _step_of(checkpoint) -> str:
    name = str(checkpoint or "")
    return f" (step {name.removeprefix('checkpoint-')})" if name.startswith("checkpoint-") else ""


def training_section(facts: TrainedFacts) -> list[str]:
    training = facts.training or {}
    lines = ["## Training", ""]
    if not training:
        if facts.espnet is not None:
            return lines + ["Trained by ESPnet; the weights were imported unchanged (see the base model's card).", ""]
        return lines + [
            "No training record was found beside the weights (`finetune_summary.json` or `train_result.json`): "
            "the data, the number of steps and the losses are unknown.",
            "",
            *_data_note(None),
        ]
    recipe = training.get("train") or {}
    if recipe.get("recipe"):
        seed = f", seed {recipe['seed']}" if recipe.get("seed") is not None else ""
        lines.append(f"- **Recipe**: `{Path(str(recipe['recipe'])).name}` (`mla-convert train`{seed})")
    sources = [_source_text(str(source)) for source in training.get("datasets") or []]
    utterances = training.get("training_utterances")
    if sources:
        count = f" ({utterances} training utterances)" if utterances is not None else ""
        lines.append(f"- **Data**: {', '.join(sources)}{count}")
    if training.get("steps") is not None:
        planned = training.get("planned_steps")
        early = " (stopped early)" if training.get("stopped_early") else ""
        of = f" of {planned} planned" if planned and planned != training["steps"] else ""
        epochs = f", {training['epochs']} epochs" if training.get("epochs") is not None else ""
        lines.append(f"- **Steps**: {training['steps']}{of}{early}{epochs}")
    if training.get("batch_size") is not None:
        accumulation = training.get("gradient_accumulation") or 1
        rate = f", learning rate {training['learning_rate']}" if training.get("learning_rate") is not None else ""
        lines.append(f"- **Batch**: {training['batch_size']} × {accumulation} utterances per step{rate}")
    losses = [entry for entry in training.get("losses") or [] if entry.get("loss") is not None]
    if losses:
        lines.append(
            f"- **Final training loss**: {float(losses[-1]['loss']):.4f} (logged at step {losses[-1].get('step')})"
        )
    if training.get("train_loss") is not None:
        lines.append(f"- **Mean training loss over the run**: {float(training['train_loss']):.4f}")
    if training.get("best_dev_wer") is not None:
        lines.append(f"- **Best dev WER**: {pct(training['best_dev_wer'])}{_step_of(training.get('best_checkpoint'))}")
    if training.get("device"):
        precision = f", {training['precision']}" if training.get("precision") else ""
        seconds = f", {training['train_seconds']} s" if training.get("train_seconds") is not None else ""
        lines.append(f"- **Trained on**: {training['device']}{precision}{seconds}")
    return lines + ["", *_data_note(utterances)]


def _data_note(utterances) -> list[str]:
    if utterances is not None and int(utterances) >= TINY_TRAINING:
        return []
    amount = f"only {utterances} utterances" if utterances is not None else "an unrecorded amount of data"
    return [
        f"**Note**: this model was trained on {amount}. That demonstrates the architecture and the training "
        "pipeline, not a usable recogniser: expect a high word error rate on real speech.",
        "",
    ]


def _license_lines(inputs: CardInputs, hub_data: bool) -> list[str]:
    base = inputs.base
    if base.hub_id:
        return license_section(base)
    if base.license and base.license != "other":
        text = f"`{base.license}`, given with `--license` when this card was written."
    else:
        text = "No licence was given (`--license`), so the metadata says `other`: ask the owner before reusing it."
    if hub_data:
        link = f"[{HUB_DATASET}](https://huggingface.co/datasets/{HUB_DATASET})"
        text += f" The terms of the training data ({link}) apply too."
    return ["## License", "", text, ""]


def _metadata(inputs: CardInputs, family: str, kind: str) -> str:
    hub_data = _hub_sources(inputs.training)
    training = {"datasets": [HUB_DATASET] if hub_data else []}  # Hub ids only: never a local folder
    base = inputs.base
    if not base.language and hub_data:
        base = replace(base, language=["en"])  # LibriSpeech is English
    data = card_data(replace(inputs, training=training, base=base))
    data.tags = list(
        dict.fromkeys(["mla-convert", "speech", family.lower(), *ATTENTION_TAGS.get(kind, [kind]), "custom_code"])
    )
    return data.to_yaml()


def render_trained_card(inputs: CardInputs, facts: TrainedFacts) -> str:
    """The full ``README.md`` of a trained own model."""
    config = own_config(inputs.config)
    family = own_families()[config.model_type]
    kind = str(config.attention.get("type"))
    report = kv_report(config)
    own, mha = int(report["kv_state_bytes_per_frame"]), int(report["kv_state_bytes_per_frame_mha"])
    if facts.espnet is not None:
        source = facts.espnet_hub_id
        where = f" ([{source}](https://huggingface.co/{source}))" if source else ""
        origin = f"imported from ESPnet{where} by `mla_convert`" + (" and trained further" if facts.training else "")
    else:
        origin = "trained with `mla_convert`"
    parameters = f", {facts.parameters:,} parameters" if facts.parameters else ""
    summary = (
        f"`{model_index_name(inputs.repo_id)}` is a {family} CTC model (ESPnet layout) {origin}, its self-attention "
        f"{attention_text(config.attention)}: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
        f"{config.num_attention_heads} heads{parameters}. "
        f"K/V state: {own} B per encoder frame ({versus_mha(own, mha)})."
    )
    evaluation = inputs.evaluation
    scores = ", ".join(
        f"{row.get('split')} {pct(row.get('wer'))}"
        for row in (evaluation.own_rows if evaluation else [])
        if row.get("wer") is not None
    )
    if scores:
        summary += f" WER: {scores}."
    body = [
        f"# {model_index_name(inputs.repo_id)}",
        "",
        summary,
        "",
        *architecture_section(config, facts),
        *kv_section(config, report),
        *evaluation_section(inputs),
        *training_section(facts),
        *usage_section(inputs, code="The model, its attention included, is remote code in this repository"),
        *_license_lines(inputs, bool(_hub_sources(facts.training))),
    ]
    return f"---\n{_metadata(inputs, family, kind)}\n---\n\n" + "\n".join(body).rstrip() + "\n"
