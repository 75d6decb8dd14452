"""The evaluation run: checks, the per-split loop, progress, the summary JSON and its text table."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..data import (
    EVALUATION_SPLITS,
    check_local_split,
    check_split,
    count_utterances,
    librispeech,
    resolve_source,
    source_label,
)
from ..distributed import barrier, broadcast, device_for_rank, gather, init_process_group, rank, world_size
from ..io import transformers_progress_bars
from .batching import Prefetcher, length_sorted_batches, utterance_records
from .errors import EvaluationError
from .journal import (
    JOURNAL_VERSION,
    Journal,
    check_output,
    default_output,
    journal_header,
    rank_journal_path,
    read_run_records,
    run_config,
    write_json_atomic,
)
from .memory import peak_memory, reset_peak_memory, transcribe_splitting_on_oom
from .model import ASRModel, check_model, is_converted, load_asr_model, resolve_device
from .overlap import calibrated_ids, check_not_calibrated_on, conversion_report, overlap_error
from .scoring import hf_evaluate_wer, totals

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_SPLITS = EVALUATION_SPLITS  # what a model is scored on unless told otherwise
BUFFER_BATCHES = 8


@dataclass
class _Progress:
    errors: int = 0
    words: int = 0

    def add(self, record: dict) -> None:
        self.errors += int(record["word_errors"])
        self.words += int(record["reference_words"])

    @property
    def wer(self) -> float:
        return self.errors / self.words if self.words else 0.0


def _progress_bar(total: int | None, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="utt", disable=not enabled, dynamic_ncols=True)


def _evaluate_split(
    asr: ASRModel,
    split: str,
    source: str | Path,
    journal: Journal,
    previous: list[dict],
    *,
    batch_size: int,
    buffer_size: int,
    limit: int | None,
    progress: bool,
    calibrated: frozenset[str] = frozenset(),
) -> None:
    done = {r["id"] for r in previous if r.get("type") in {"utterance", "unreadable"}}
    world, me = world_size(), rank()
    dataset = librispeech(
        split, source, asr.sampling_rate, limit=limit, exclude_ids=done, keep_unreadable=True, shard=(me, world)
    )
    known = count_utterances(split, source)
    total = min(limit, known) if (limit and known) else (limit or known)
    if world > 1 and total is not None:  # this rank's share of what is left (the bar is rank 0's)
        total = len(done) + -(-(total - len(done)) // world)
    running = _Progress()
    for record in previous:
        if record.get("type") == "utterance":
            running.add(record)

    def produce() -> Iterator[tuple[str, Any, Any]]:
        unreadable: list[dict] = []

        def readable_rows() -> Iterator[dict]:
            for row in dataset:
                if row["id"] in calibrated:  # a Hub stream: ids are only known as they come
                    raise overlap_error(asr.model_id, split, [row["id"]])
                if row["audio"] is None:
                    unreadable.append(row)  # reported below, between batches
                    continue
                yield row

        for batch in length_sorted_batches(readable_rows(), batch_size, buffer_size):
            while unreadable:
                yield "unreadable", unreadable.pop(0), None
            yield "batch", batch, asr.prepare([row["audio"] for row in batch])
        while unreadable:
            yield "unreadable", unreadable.pop(0), None

    bar = _progress_bar(total, len(done), f"{Path(asr.model_id).name or asr.model_id} {split}", progress)
    if running.words:
        bar.set_postfix(wer=f"{running.wer:.4f}")

    def on_split(size: int, half: int, reason: str) -> None:
        logger.warning("out of memory on a batch of %d: retrying it as %d + %d", size, half, size - half)
        journal.append([{"type": "oom", "model": asr.model_id, "split": split, "batch_size": size,
                         "halves": [half, size - half], "error": reason}])  # fmt: skip

    reset_peak_memory(asr.device)
    prefetch = Prefetcher(produce)
    try:
        last = time.perf_counter()
        for kind, item, prepared in prefetch:
            if kind == "unreadable":
                logger.warning("skipping unreadable audio %s", item["error"])
                journal.append([{"type": "unreadable", "model": asr.model_id, "split": split, "id": item["id"],
                                 "error": item["error"]}])  # fmt: skip
                bar.update(1)
                continue
            parts = transcribe_splitting_on_oom(asr, item, prepared, on_split)
            now = time.perf_counter()
            seconds, last = (now - last) / len(item), now
            records = [r for rows, result in parts for r in utterance_records(asr, rows, result, split, seconds)]
            for record in records:
                if record.get("truncated"):
                    logger.warning("%s: %.1f s of audio, scored on the model's input window", record["id"],
                                   record["duration"])  # fmt: skip
                running.add(record)
            journal.append(records)
            bar.update(len(item))
            bar.set_postfix(wer=f"{running.wer:.4f}")
    finally:
        prefetch.close()
        bar.close()
    # every rank's peak; the split is done once all ranks are (rank 0 records it, after them all)
    peaks = gather(peak_memory(asr.device))
    if me == 0:
        known_peaks = [peak for peak, _ in peaks if peak is not None]
        journal.append([{"type": "done", "model": asr.model_id, "split": split,
                         "peak_memory_bytes": max(known_peaks) if known_peaks else None,
                         "peak_memory_kind": peaks[0][1], "device": str(asr.device), "world_size": world}])  # fmt: skip


def summarize(records: list[dict]) -> dict:
    """The final JSON, recomputed from the journal's records alone."""
    header = journal_header(records) or {"config": {}}
    config = header.get("config", {})
    info = {r["model"]: r for r in records if r.get("type") == "model"}
    finished = {(r["model"], r["split"]): r for r in records if r.get("type") == "done"}
    results = []
    for model_id in config.get("models", []):
        for split in config.get("splits", []):
            subset = [r for r in records if r.get("model") == model_id and r.get("split") == split]
            # the same id twice (should not happen): the last line wins
            by_id = {r["id"]: r for r in subset if r.get("type") in {"utterance", "unreadable"}}
            chosen = list(by_id.values())
            entry = {"model": model_id, "split": split, **totals(chosen)}
            scored = [r for r in chosen if r.get("type") == "utterance"]
            entry["evaluate_wer"] = hf_evaluate_wer([r["reference"] for r in scored], [r["hypothesis"] for r in scored])
            done = finished.get((model_id, split), {})
            entry["peak_memory_bytes"] = done.get("peak_memory_bytes")
            entry["peak_memory_kind"] = done.get("peak_memory_kind")
            # batches halved after running out of memory, and the smallest batch that took
            halves = [size for r in subset if r.get("type") == "oom" for size in r.get("halves", [])]
            entry["oom_retries"] = sum(1 for r in subset if r.get("type") == "oom")
            entry["oom_smallest_batch_size"] = min(halves) if halves else None
            model_info = {k: v for k, v in info.get(model_id, {}).items() if k not in {"type", "model"}}
            entry.update(model_info)
            if done.get("device"):
                entry["device"] = done["device"]
            entry["complete"] = (model_id, split) in finished
            results.append(entry)
    return {
        "format_version": JOURNAL_VERSION,
        "created": header.get("created"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "runs": sum(1 for r in records if r.get("type") == "start"),
        "results": results,
    }


def _classes_line(asr: ASRModel) -> str:
    return f"{asr.model_id}: classes: {asr.info.get('classes')}"


def evaluate_models(
    models: Sequence[str],
    splits: Sequence[str] = DEFAULT_SPLITS,
    *,
    data: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    device: str = "auto",
    fp16: bool = False,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    buffer_size: int | None = None,
    results_dir: str | os.PathLike = "results",
    remote_code: bool = True,
) -> tuple[dict, Path]:
    """Evaluate every model on every split; returns ``(the JSON written, its path)``.

    The journal ``<output>.jsonl`` makes a run resumable: the same call after a crash or kill
    continues after the utterances already scored. The JSON appears only when everything is done.
    Everything cheap is checked before any model is loaded (models' configs, splits, data, limit,
    batch size, output, calibration overlap); a run that fails before scoring anything removes the
    journal it started, so the corrected command starts afresh. A batch out of memory is halved and
    retried. Converted models run their saved remote code unless ``remote_code=False`` (then the
    installed mla_convert classes); each model's line and JSON ``classes`` say which.
    """
    if not models:
        raise EvaluationError("give at least one model")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1 (got {batch_size})")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1 (got {limit})")
    splits = list(dict.fromkeys(splits))
    for split in splits:
        check_split(split)
    torch_device = device_for_rank(resolve_device(device))
    init_process_group(torch_device)
    world, me = world_size(), rank()
    progress = progress and me == 0
    if fp16 and torch_device.type == "cpu":
        logger.warning("--fp16 on the CPU: float16 kernels are slow there and may be missing; consider cuda")
    models = list(dict.fromkeys(models))
    source = resolve_source(data)
    if source != "hub":
        for split in splits:
            check_local_split(source, split)
    reports: dict[str, dict | None] = {}
    for model_id in models:  # every model id is checked before anything is written
        path, config, _ = check_model(model_id)
        reports[model_id] = conversion_report(path) if is_converted(config) else None
        for split in splits:
            check_not_calibrated_on(model_id, reports[model_id], split, source, limit)
    config = run_config(models, splits, source_label(source), limit, fp16)
    if not remote_code:  # only when not the default, so journals of earlier versions still resume
        config["installed_classes"] = True
    output = Path(output) if output is not None else default_output(config, results_dir)
    output = Path(broadcast(str(output)))  # one name for all ranks (a default one is timed)
    check_output(output)
    # every rank reads every journal of the run (its own, and those of ranks of any earlier
    # launch), so all agree on what is left before any of them writes
    records = read_run_records(output)
    barrier()
    journal = Journal(rank_journal_path(output, me))
    own_records = journal.read()
    header = journal_header(records)
    if records and header is None:
        raise EvaluationError(f"{journal.path} is not an evaluation journal; choose another --output")
    if header is not None and header.get("config") != config:
        raise EvaluationError(
            f"{journal.path} holds a different run ({_describe(header.get('config', {}))}); "
            "run that command to resume it, or choose another --output"
        )
    if header is None and output.exists():
        raise EvaluationError(f"{output} already exists (without its journal); choose another --output")
    fresh = header is None
    new_folders = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]
    try:
        if header is None:
            created = broadcast(datetime.now(timezone.utc).isoformat(timespec="seconds"))
            header = {"type": "run", "format_version": JOURNAL_VERSION, "created": created, "config": config}
            records = [header]
        if not own_records:  # a rank's journal starts with the run's header too: each file stands alone
            journal.append([header])
        resumed = sum(1 for r in records if r.get("type") == "utterance")
        if resumed and me == 0:
            logger.warning("resuming %s: %d utterances already scored", journal.path, resumed)
        if me == 0:
            journal.append([{"type": "start", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "batch_size": batch_size, "device": str(torch_device), "world_size": world}])  # fmt: skip
        records.append({"type": "start"})
        finished = {(r["model"], r["split"]) for r in records if r.get("type") == "done"}
        for model_id in models:
            todo = [split for split in splits if (model_id, split) not in finished]
            if not todo:
                continue
            with transformers_progress_bars(progress):
                asr = load_asr_model(model_id, torch_device, fp16, remote_code=remote_code)
            logger.info("%s", _classes_line(asr))
            if progress:
                print(_classes_line(asr), file=sys.stderr, flush=True)
            try:
                model_record = {"type": "model", **asr.info, "batch_size": batch_size}
                journal.append([model_record])
                records.append(model_record)
                for split in todo:
                    previous = [r for r in records if r.get("model") == model_id and r.get("split") == split]
                    _evaluate_split(
                        asr,
                        split,
                        source,
                        journal,
                        previous,
                        batch_size=batch_size,
                        buffer_size=buffer_size or batch_size * BUFFER_BATCHES,
                        limit=limit,
                        progress=progress,
                        calibrated=calibrated_ids(reports[model_id]),
                    )
            finally:
                asr.close()
        journal.close()
        barrier()
        payload: dict = {}
        if me == 0:  # rank 0 merges every rank's journal and writes the one JSON
            payload = summarize(read_run_records(output))
            payload["journal"] = journal.path.name
            payload["world_size"] = world
            if world > 1:
                payload["rank_journals"] = [rank_journal_path(output, r).name for r in range(1, world)]
            write_json_atomic(output, payload)
        return broadcast(payload), output
    except BaseException:
        journal.close()
        if fresh and journal.scored == 0:  # nothing to resume: leave no journal to block the next command
            journal.path.unlink(missing_ok=True)
            for folder in new_folders:  # innermost first; only the empty folders this run made
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    finally:
        journal.close()


def _describe(config: dict) -> str:
    return (
        f"models {', '.join(config.get('models', []))}; splits {', '.join(config.get('splits', []))}; "
        f"data {config.get('data')}; limit {config.get('limit')}; fp16 {config.get('fp16')}"
    )


def format_results(payload: dict) -> str:
    """A plain-text table of a result JSON."""
    header = ["model", "split", "WER", "CER", "utts", "audio s", "wall s", "RTF", "kv B/frame"]
    rows = [header]
    for entry in payload.get("results", []):
        rows.append(
            [
                str(entry["model"]),
                entry["split"],
                _pct(entry.get("wer")),
                _pct(entry.get("cer")),
                f"{entry.get('utterances', 0)}"
                + (f" +{entry['unreadable']} unreadable" if entry.get("unreadable") else ""),
                f"{entry.get('audio_seconds', 0):.1f}",
                f"{entry.get('wall_seconds', 0):.1f}",
                "-" if entry.get("real_time_factor") is None else f"{entry['real_time_factor']:.3f}",
                "-" if entry.get("kv_state_bytes_per_frame") is None else str(entry["kv_state_bytes_per_frame"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
