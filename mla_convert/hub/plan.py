"""The folder a push uploads, built and checked before anything leaves the machine.

:func:`plan_upload` reads a directory written by ``mla-convert convert`` (or ``save_pretrained``
of a converted model): its top-level files (weights, config, the remote-code ``.py`` files,
processor files, ``conversion_report.json``) plus a generated ``README.md``
(:func:`mla_convert.hub.card.render_card`). The folder is checked first: every ``*.safetensors``
opens and its header covers the file exactly, every shard of an index exists, every module the
``auto_map`` needs (and every sibling it imports) is there, and :func:`check_remote_code_imports`
imports the remote code in a fresh Python process that has no mla_convert. ``--dry-run`` writes
exactly that folder to a local directory (:func:`write_upload_folder`). Nothing in the model
directory is changed or deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DamagedFileError, ModelNotFoundError, first_line
from ..io import atomic_output_dir, check_safetensors
from .access import REACH_TIMEOUT, PushSourceError, check_repo_id, hub_offline, hub_reachable
from .card import render_card
from .card_inputs import BaseModelInfo, CardInputs, attention_type, conversion
from .card_trained import attention_summary, is_own_model, parameter_count, render_trained_card, trained_facts
from .sources import (
    display_name,
    evaluation_info,
    find_evaluation_file,
    load_evaluation,
    read_json,
    recorded_base_model,
    resolve_base_model,
)

logger = logging.getLogger(__name__)

REMOTE_CODE_TIMEOUT = 300.0  # seconds for the fresh process that imports the remote code
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
    made: str = "converted"  # or "trained": one of mla_convert's own models, not converted

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


# ------------------------------------------------------------------------------------------ checks


def read_model_dir(model_dir: str | Path) -> tuple[Path, dict, dict | None]:
    """``(directory, config dict, conversion report dict or None)`` of a converted model, or of one of
    mla_convert's own Conformer / Branchformer models (trained, so without ``attention_conversion``)."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"no such model directory: {model_dir}")
    config_path = model_dir / "config.json"
    config = read_json(
        config_path, f"{model_dir} has no config.json: not a saved Hugging Face model", f"cannot read {config_path}"
    )
    if not conversion(config) and not is_own_model(config):
        raise PushSourceError(
            f"{model_dir} is not a model converted by mla_convert (its config.json has no attention_conversion)"
        )
    report = None
    report_path = model_dir / "conversion_report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PushSourceError(f"cannot read {report_path}: {first_line(error)}") from None
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
            raise PushSourceError(f"cannot read {files[index]}: {first_line(error)}") from None
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
        raise PushSourceError(f"cannot read {path}: {first_line(error)}") from None
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
    trained = None if conversion(config) else trained_facts(model_dir, training)
    if trained is not None:  # an own model: a base model only if named, or the Hub id of an ESPnet import
        base_value = base_model or trained.espnet_hub_id
        base = resolve_base_model(base_value, {}, None, license=license, online=online)  # {}: nothing recorded
    else:
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
            models = sorted({display_name(row) for _, row in evaluation.other_rows})
            message = f"{evaluation_path} has no results for {model_dir} (models in it: {', '.join(models) or 'none'})"
            if eval_json is not None:
                raise PushSourceError(message)
            logger.warning("%s; the card shows them for comparison only", message)
    files, skipped = collect_files(model_dir, config, exclude)
    inputs = CardInputs(
        repo_id=repo_id,
        config=config,
        report=report,
        files=sorted([*files, "README.md"]),
        base=base,
        evaluation=evaluation,
        training=_training(model_dir, training) if trained is None else trained.training,
    )
    if trained is not None:
        trained.parameters = parameter_count(files)
        card = render_trained_card(inputs, trained)
        summary = attention_summary(config)
    else:
        card = render_card(inputs)
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
        made="converted" if trained is None else "trained",
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
