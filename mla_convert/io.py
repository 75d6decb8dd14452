"""Writing outputs so that a failed or interrupted run leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DamagedFileError, MlaConvertError, OutputError, first_line

logger = logging.getLogger(__name__)

# Inside every staging directory while it is being written: {"pid": ..., "host": ...} of the writer.
OWNER_FILE = ".owner"
STAGING_SUFFIXES = (".partial", ".old")
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own bound on the JSON header


class OutputExistsError(MlaConvertError):
    """The output directory exists and overwriting was not asked for."""


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (the directory a mkdir would start from)."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_output_dir(output: str | Path, overwrite: bool) -> Path:
    """``output`` as a path, refusing at once an existing one (without ``overwrite``), a file on the way
    to it, and a parent directory this process may not write to."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    ancestor = _existing_ancestor(output.parent)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {output}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {output}: {ancestor} is not writable (permission denied)")
    return output


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OSError, OverflowError):
        return False
    return True


def _write_owner(directory: Path) -> None:
    (directory / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _stale(directory: Path) -> bool:
    """A staging directory whose writer, on this host, is no longer running."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours, or written by a version without the marker: leave it alone
    return host == socket.gethostname() and not _pid_alive(pid)


def remove_stale_staging(parent: str | Path) -> list[Path]:
    """Remove ``.NAME.*.partial`` / ``.NAME.*.old`` directories in ``parent`` left by a killed run.

    Only directories with an owner marker naming a process of this host that is gone are removed;
    returns what was removed.
    """
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(STAGING_SUFFIXES) and entry.is_dir()):
            continue
        if _stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            logger.info("removed %s, left by an interrupted run", entry)
            removed.append(entry)
    return removed


def _make_staging(output: Path, suffix: str) -> Path:
    try:
        directory = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=suffix, dir=output.parent))
        _write_owner(directory)
    except PermissionError:
        raise OutputError(f"cannot write {output}: {output.parent} is not writable (permission denied)") from None
    return directory


def _output_error(error: BaseException, output: Path) -> OutputError | None:
    """The one-line error for a failed write of ``output``: no space left, permission denied."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device while writing {output}; nothing was written")
    if isinstance(error, PermissionError):
        where = error.filename or output
        return OutputError(f"permission denied while writing {output} ({where}); nothing was written")
    return None


@contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; rename it to ``output`` on success only.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and an
    existing ``output`` is left untouched; a full disk or a permission error becomes a one-line
    :class:`OutputError`. Each staging directory holds an owner marker (pid and host) while it is
    written, so a run killed outright (``kill -9``) leaves one that the next run writing to the same
    parent directory removes once that process is gone.
    """
    output = check_output_dir(output, overwrite)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"cannot write {output}: a file is in the way of {output.parent}") from None
    except PermissionError:
        raise OutputError(f"cannot write {output}: permission denied creating {output.parent}") from None
    remove_stale_staging(output.parent)
    staging = _make_staging(output, ".partial")
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield staging
        (staging / OWNER_FILE).unlink(missing_ok=True)
        if output.exists():
            retired = _make_staging(output, ".old")
            output.rename(retired / output.name)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        translated = _output_error(error, output)
        if translated is not None:
            raise translated from error
        raise


@contextmanager
def atomic_files_into(directory: str | Path) -> Iterator[Path]:
    """Yield a staging folder inside ``directory``; on success only, move each entry written there
    into ``directory`` (which keeps what else it holds: a training run's checkpoints and logs).

    On any exception the staging folder is removed and ``directory`` is left as it was; a full disk or
    a permission error becomes a one-line :class:`OutputError`. The folder holds an owner marker
    while it is written, so one left by a killed run is removed by the next (see :func:`atomic_output_dir`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(directory)
    staging = _make_staging(directory / "files", ".partial")
    try:
        yield staging
        (staging / OWNER_FILE).unlink(missing_ok=True)
        for entry in staging.iterdir():
            entry.replace(directory / entry.name)
    except BaseException as error:
        translated = _output_error(error, directory)
        if translated is not None:
            raise translated from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json_file(path: str | Path, what: str) -> object:
    """A JSON file's content; a one-line :class:`DamagedFileError` naming ``what`` if it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DamagedFileError(f"{what} is not valid JSON (not UTF-8 text: {error.reason})") from None
    except json.JSONDecodeError as error:
        raise DamagedFileError(
            f"{what} is not valid JSON (line {error.lineno} column {error.colno}: {error.msg})"
        ) from None


def check_safetensors(path: str | Path, what: str | None = None) -> int:
    """Check that a ``.safetensors`` file is complete; returns its tensor count.

    The header must parse and its tensors must cover the file exactly (a truncated or padded file
    fails), and ``safetensors`` must open it and read every tensor's metadata. Raises a one-line
    :class:`DamagedFileError` naming ``what`` (default: the path) otherwise.
    """
    path = Path(path)
    what = what or str(path)

    def damaged(reason: str) -> DamagedFileError:
        return DamagedFileError(f"{what} is damaged: {reason}")

    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise damaged(f"{size} bytes, too short for a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(SAFETENSORS_HEADER_LIMIT, size - 8):
            raise damaged(f"its header claims {header_size} bytes but the file has {size} (truncated?)")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise damaged("its header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    try:
        end = max((int(info["data_offsets"][1]) for info in tensors.values()), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        raise damaged("its header has a tensor without data offsets") from None
    expected = 8 + header_size + end
    if expected != size:
        raise damaged(f"its header describes {expected} bytes but the file has {size} (truncated or overwritten?)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as opened:
            for name in opened.keys():
                opened.get_slice(name).get_shape()
    except (SafetensorError, OSError, ValueError) as error:
        raise damaged(first_line(error)) from None
    return len(tensors)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own loading/saving bars follow the caller's ``--quiet``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
