"""Memory during a run: halving a batch that runs out of memory, and the peak memory of a split."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import first_line
from .errors import EvaluationError
from .model import ASRModel, Transcripts

# RuntimeError messages of a failed allocation (CPU: Linux / Windows; other backends)
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA's ``OutOfMemoryError``, ``MemoryError``, or a ``RuntimeError`` whose
    message says memory could not be allocated (``DefaultCPUAllocator: can't allocate memory``...)."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def transcribe_splitting_on_oom(
    asr: ASRModel, rows: Sequence[dict], prepared: dict[str, Any], on_split: Callable[[int, int, str], None]
) -> list[tuple[list[dict], Transcripts]]:
    """``[(rows, transcripts)]`` of one batch: out of memory, the batch is halved and each half run
    again (recursively, down to one utterance); ``on_split(batch size, first half, error)`` is told of
    every split. The halves keep the whole batch's generation limit, so every utterance is decoded as
    in the unsplit batch. An utterance out of memory alone is a one-line :class:`EvaluationError`."""
    try:
        return [(list(rows), asr.transcribe(prepared))]
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        reason = first_line(error)
    _release_memory(asr.device)  # outside the handler: the traceback no longer holds the batch's tensors
    if len(rows) == 1:
        row = rows[0]
        raise EvaluationError(
            f"{row['id']} ({float(row['duration']):.1f} s of audio) does not fit in memory on {asr.device} "
            f"even alone: {reason}"
        )
    half = (len(rows) + 1) // 2
    on_split(len(rows), half, reason)
    results = []
    for part in (rows[:half], rows[half:]):
        sub = asr.prepare([row["audio"] for row in part])
        sub["max_seconds"] = prepared["max_seconds"]
        results.extend(transcribe_splitting_on_oom(asr, part, sub, on_split))
    return results


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as file:  # resets VmHWM (Linux)
            file.write("5")


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process_peak_rss"
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"
    except (ImportError, OSError):
        return None, "unknown"
