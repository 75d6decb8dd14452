"""The run's files: the resumable JSON-lines journal, its header and run config, output names, the final JSON."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from ..io import atomic_file
from .errors import EvaluationError

logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1


class Journal:
    """Append-only JSON lines; every ``append`` is flushed and fsynced, a torn last line is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = None
        self.scored = 0  # utterance and unreadable records appended by this process

    def read(self) -> list[dict]:
        """All complete records. Bytes after the last newline are a torn write: cut off the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        records = []
        for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise EvaluationError(f"{self.path} line {number} is not JSON: the journal is damaged") from None
        if complete < len(data):
            logger.warning("%s: ignoring a torn last line (%d bytes)", self.path, len(data) - complete)
            with open(self.path, "r+b") as file:
                file.truncate(complete)
        return records

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.scored += sum(1 for r in records if r.get("type") in {"utterance", "unreadable"})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def run_config(models: Sequence[str], splits: Sequence[str], data: str, limit: int | None, fp16: bool) -> dict:
    return {"models": list(models), "splits": list(splits), "data": data, "limit": limit, "fp16": bool(fp16)}


def journal_path(output: Path) -> Path:
    return output.with_suffix(".jsonl")


def rank_journal_path(output: Path, rank: int) -> Path:
    """The journal one process writes: ``<output>.jsonl`` for a one-process run and rank 0 of a
    launched one, ``<output>.rank<r>.jsonl`` for rank r > 0."""
    return journal_path(output) if rank == 0 else output.with_name(f"{output.stem}.rank{rank}.jsonl")


def rank_journal_paths(output: Path) -> list[Path]:
    """The journals ranks > 0 of any earlier launched run of ``output`` wrote, in rank order."""
    found = []
    for path in output.parent.glob(f"{output.stem}.rank*.jsonl"):
        number = path.name[len(output.stem) + len(".rank") : -len(".jsonl")]
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def read_run_records(output: Path) -> list[dict]:
    """Every record of the run at ``output``, one process's or many ranks' journals merged: the
    header once (first), then rank 0's records, then each other rank's. An utterance is scored in
    one journal only; a later record of the same id (a resumed run) wins when they are summarised."""
    merged = Journal(journal_path(output)).read()
    for path in rank_journal_paths(output):
        records = Journal(path).read()
        if not merged and records:
            merged = records[:1] if journal_header(records) else []
        merged.extend(record for record in records if record.get("type") != "run")
    return merged


def journal_header(records: list[dict]) -> dict | None:
    return records[0] if records and records[0].get("type") == "run" else None


def default_output(config: dict, results_dir: str | Path = "results") -> Path:
    """``results/eval-<timestamp>.json``, or the unfinished run of the same command to resume."""
    results_dir = Path(results_dir)
    for journal in sorted(results_dir.glob("eval-*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True):
        output = journal.with_suffix(".json")
        if output.exists():
            continue
        try:
            with open(journal, encoding="utf-8") as file:
                header = json.loads(file.readline() or "{}")
        except (OSError, ValueError):
            continue
        if header.get("type") == "run" and header.get("config") == config:
            return output
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    output = results_dir / f"eval-{stamp}.json"
    counter = 1
    while output.exists() or journal_path(output).exists():
        counter += 1
        output = results_dir / f"eval-{stamp}-{counter}.json"
    return output


def write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_output(output: Path) -> None:
    """One-line errors for an output the run could not write, before any model is loaded."""
    if output.suffix == ".jsonl":
        raise EvaluationError(f"--output {output}: give the .json name; the journal goes next to it as .jsonl")
    if output.is_dir():
        raise EvaluationError(f"--output {output} is a folder; give a file name such as {output / 'eval.json'}")
    existing = output.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise EvaluationError(f"--output {output}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvaluationError(f"--output {output}: {existing} is not writable")
