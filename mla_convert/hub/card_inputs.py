"""What a model card is made from: its inputs (:class:`CardInputs`, :class:`BaseModelInfo`,
:class:`EvaluationInfo`) and the facts read off a converted model's ``config.json`` and
``conversion_report.json`` (attention kind, host, Auto class, calibration datasets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..data import HUB_DATASET

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


def calibration_datasets(report: dict | None) -> list[str]:
    """Hub datasets the calibration utterances came from, recognised by their ids."""
    ids = [*((report or {}).get("calibration_ids") or []), *((report or {}).get("held_out_ids") or [])]
    found = []
    for pattern, dataset in ID_DATASETS:
        if any(pattern.match(str(utterance)) for utterance in ids):
            found.append(dataset)
    return found
