"""Feeding the model: length-sorted batches, the background prefetch thread, and per-utterance records."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..distributed import is_distributed, rank
from .model import ASRModel, Transcripts
from .scoring import score


def length_sorted_batches(rows: Iterable[dict], batch_size: int, buffer_size: int) -> Iterator[list[dict]]:
    """Batches of similar length: fill a bounded buffer, sort it (longest first), cut it into batches."""
    buffer: list[dict] = []

    def flush() -> Iterator[list[dict]]:
        buffer.sort(key=lambda row: len(row["audio"]), reverse=True)
        for start in range(0, len(buffer), batch_size):
            yield buffer[start : start + batch_size]
        buffer.clear()

    for row in rows:
        buffer.append(row)
        if len(buffer) >= max(buffer_size, batch_size):
            yield from flush()
    if buffer:
        yield from flush()


class Prefetcher:
    """Run a producer iterator in a background thread, ``depth`` items ahead of the consumer."""

    _DONE = object()

    def __init__(self, producer: Callable[[], Iterator[Any]], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(producer,), name="mla-convert-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, producer: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in producer():
                if not self._put(("item", item)):
                    return
            self._put(("done", None))
        except BaseException as error:  # handed to the consumer, raised there
            self._put(("error", error))

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, item = self._queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def utterance_records(
    asr: ASRModel, rows: Sequence[dict], result: Transcripts, split: str, seconds: float
) -> list[dict]:
    """One scored journal record per utterance of a transcribed batch (normalised text, jiwer counts)."""
    records = []
    for index, row in enumerate(rows):
        reference, hypothesis = asr.normalize(row["text"]), asr.normalize(result.texts[index])
        record = {
            "type": "utterance",
            "model": asr.model_id,
            "split": split,
            "id": row["id"],
            "reference": reference,
            "hypothesis": hypothesis,
            "transcript": result.texts[index],  # as the model wrote it, before normalisation
            **score(reference, hypothesis),
            "duration": round(float(row["duration"]), 6),
            "seconds": seconds,
        }
        if result.hit_limit is not None:
            record["generated_tokens"] = result.generated_tokens[index]
            record["hit_generation_limit"] = bool(result.hit_limit[index])
            record["max_new_tokens"] = result.max_new_tokens
        if result.truncated is not None:
            record["truncated"] = bool(result.truncated[index])
        if is_distributed():  # ranks decode side by side: the split's wall time is the slowest rank's
            record["rank"] = rank()
        records.append(record)
    return records
