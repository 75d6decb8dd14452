"""``mla-convert push``: upload a converted model to the Hugging Face Hub with a model card.

:func:`push_to_hub` is the one entry point for every command that pushes (``push``,
``convert --push-to-hub`` and ``finetune --push-to-hub``, which passes ``training=``). What the user
can fix (the directory, the options) is checked first (:func:`mla_convert.hub.plan.plan_upload`),
then the Hub (:func:`mla_convert.hub.access.check_hub_access`), then the remote code in a fresh
interpreter; a real push stages the folder (hard links) in a temporary directory beside the model
and hands it to ``huggingface_hub`` (``create_repo(exist_ok=True)`` + one ``upload_folder``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .access import check_hub_access, check_repo_id, hub_error
from .plan import UploadPlan, check_remote_code_imports, default_dry_run_dir, plan_upload, write_upload_folder

# Remote weight files that the upload replaces: a re-push with other sharding must not leave stale shards.
WEIGHT_DELETE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


@dataclass
class PushResult:
    repo_id: str
    files: list[str]
    folder: Path | None = None  # dry run: where the folder was written
    url: str | None = None
    commit_url: str | None = None
    revision: str | None = None
    plan: UploadPlan | None = None


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
    message = (
        commit_message or f"Upload {repo_id.split('/')[-1]}: {plan.summary} attention, {plan.made} with mla_convert"
    )
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
            raise hub_error(error, plan.repo_id) from None
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
