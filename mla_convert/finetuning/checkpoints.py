"""The run directory's checkpoints and final model: the newest complete checkpoint, pruning, the step plan."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..distributed import own_class
from ..io import atomic_files_into
from .config import PROGRESS_FILE, FinetuneConfig

if TYPE_CHECKING:
    from .run import FinetuneRun


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose trainer state was written (a kill mid-save leaves one without)."""
    if not checkpoints.is_dir():
        return None
    complete = []
    for path in checkpoints.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "trainer_state.json").is_file() and (path / PROGRESS_FILE).is_file():
            complete.append((int(step), path))
    return max(complete)[1] if complete else None


def planned_steps(config: FinetuneConfig, size: int | None) -> int | None:
    """Optimizer steps of the run, when the dataset size is known (a stream needs --max-steps)."""
    if config.max_steps:
        return config.max_steps
    if size is None:
        return None
    per_epoch = max(1, math.ceil(math.ceil(size / config.batch_size) / config.grad_accum))
    return max(1, math.ceil(per_epoch * config.epochs))


def drop_checkpoints_from(checkpoints: Path, step: int) -> list[str]:
    """Remove checkpoints whose weights produced the non-finite loss (saved at ``step`` or later)."""
    removed = []
    for path in sorted(checkpoints.glob("checkpoint-*")):
        number = path.name.removeprefix("checkpoint-")
        if number.isdigit() and int(number) >= step:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def save_final_model(
    run: FinetuneRun, model: nn.Module, model_path: str, output: Path, weights: dict[str, Tensor] | None = None
) -> None:
    """Model + processor into ``output`` (beside checkpoints/ and runs/), staged then moved in.
    ``weights``: the full state dict gathered from an FSDP-sharded ``model`` (else its own)."""
    from ..checkpoint import save_processor

    with atomic_files_into(output) as staging:
        if getattr(model.config, "use_cache", None) is False:
            model.config.use_cache = True
        with own_class(model):
            model.save_pretrained(staging, state_dict=_without_tied_copies(model, weights))
        if not save_processor(model_path, staging):
            run.student.feature_extractor.save_pretrained(staging)
            run.student.tokenizer.save_pretrained(staging)
        report = Path(model_path) / "conversion_report.json"
        if report.is_file():
            shutil.copy2(report, staging / report.name)


def _without_tied_copies(model: nn.Module, weights: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """A state dict gathered from FSDP shards holds a tied weight (Whisper's ``proj_out`` and its
    token embedding) twice, as separate tensors; the copy is dropped, as ``save_pretrained`` drops
    it from a model whose parameters are shared."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if not weights or not tied:
        return weights
    return {
        name: value
        for name, value in weights.items()
        if not (name in tied and tied[name] in weights and torch.equal(value, weights[tied[name]]))
    }
