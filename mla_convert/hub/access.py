"""Whether the Hub can be used now: offline mode, the token, one TCP connect, the repo id.

Every refusal is a one-line :class:`HubError` (or :class:`PushSourceError` for a bad ``--repo-id``)
raised before any network call beyond that one connect, never a retry loop. Nothing here imports
torch or transformers, so those refusals take a fraction of a second. The token is left to
``huggingface_hub``; it is never printed or written anywhere. :func:`hub_error` turns whatever the
Hub client raises during an upload into one line.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from ..errors import MlaConvertError, first_line

REACH_TIMEOUT = 1.5  # seconds for the one TCP connect that tells whether the Hub can be reached


class HubError(MlaConvertError):
    """The Hub cannot be used now: offline mode, no token, unreachable, or it refused the request."""


class PushSourceError(MlaConvertError):
    """The directory (or an option) cannot be pushed as it is: not converted, files missing, bad repo id."""


def check_repo_id(repo_id: str) -> str:
    if not repo_id or repo_id.count("/") != 1:
        raise PushSourceError(f"--repo-id must be USER/NAME or ORG/NAME, got {repo_id!r}")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushSourceError(f"invalid --repo-id {repo_id!r}: {first_line(error)}") from None
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
            raise HubError(f"cannot get a Hugging Face token: {first_line(error)}") from None
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (it needs write access)")
    if not hub_reachable(timeout):
        raise HubError(f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached; nothing was pushed")


def check_push_ready(repo_id: str, token: str | None = None) -> None:
    """Everything that can fail a push without touching the model: for commands that push at the end."""
    check_repo_id(repo_id)
    check_hub_access(token)


def hub_error(error: Exception, repo_id: str) -> HubError:
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
    reason = " ".join(str(server).split()) if server else first_line(error)
    return HubError(f"pushing to {repo_id} failed: {prefix}{reason}")
