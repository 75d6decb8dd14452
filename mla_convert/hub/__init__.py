"""Pushing converted models to the Hugging Face Hub with a generated model card.

One job a module: :mod:`.access` (offline mode, token, reachability, repo id, the Hub's errors in
one line), :mod:`.plan` (the folder to upload, its checks, the dry-run folder and listing),
:mod:`.sources` (the base model and the evaluation JSON behind the card), :mod:`.push`
(:func:`push_to_hub`), and the card: :mod:`.card` (metadata, :func:`render_card`),
:mod:`.card_inputs`, :mod:`.card_conversion` and :mod:`.card_sections`. Nothing here imports torch
or transformers at import time, so an offline ``mla-convert push`` is refused at once.
"""

from __future__ import annotations

from .access import (
    HubError,
    PushSourceError,
    check_hub_access,
    check_push_ready,
    check_repo_id,
    hub_offline,
    hub_reachable,
)
from .card import parse_front_matter, read_card, render_card
from .card_inputs import BaseModelInfo, CardInputs, EvaluationInfo
from .plan import (
    UploadPlan,
    check_remote_code_imports,
    collect_files,
    default_dry_run_dir,
    format_listing,
    plan_upload,
    read_model_dir,
    write_upload_folder,
)
from .push import PushResult, push_to_hub
from .sources import evaluation_info, recorded_base_model, resolve_base_model

__all__ = [
    "BaseModelInfo",
    "CardInputs",
    "EvaluationInfo",
    "HubError",
    "PushResult",
    "PushSourceError",
    "UploadPlan",
    "check_hub_access",
    "check_push_ready",
    "check_remote_code_imports",
    "check_repo_id",
    "collect_files",
    "default_dry_run_dir",
    "evaluation_info",
    "format_listing",
    "hub_offline",
    "hub_reachable",
    "parse_front_matter",
    "plan_upload",
    "push_to_hub",
    "read_card",
    "read_model_dir",
    "recorded_base_model",
    "render_card",
    "resolve_base_model",
    "write_upload_folder",
]
