"""Settings of a fine-tuning run: :class:`FinetuneConfig`, its checks, the run directory's file names."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..data import EVALUATION_SPLITS, check_split
from ..errors import MlaConvertError

FREEZE_CHOICES = ("feature-encoder", "non-attention", "none")
# transformers' schedulers a run may choose (linear: warm-up then linear decay to 0; inverse_sqrt: warm-up
# then lr * sqrt(warmup / step), the Noam / ESPnet warmuplr shape for training from scratch)
LR_SCHEDULERS = ("linear", "cosine", "inverse_sqrt", "constant_with_warmup")
ARGS_FILE = "finetune_args.json"
SUMMARY_FILE = "finetune_summary.json"
EVALUATION_FILE = "evaluation.json"
TRAINED_FILE = "train_result.json"
PROGRESS_FILE = "mla_convert_progress.json"
CHECKPOINTS = "checkpoints"
# settings that may differ between the interrupted run and its --resume
RESUME_MAY_CHANGE = {"resume", "progress", "test_splits", "test_limit", "test_data", "eval_batch_size"}


class FinetuneError(MlaConvertError):
    """A fine-tuning request that cannot run (bad settings, missing data, incompatible teacher, NaN loss)."""


@dataclass
class FinetuneConfig:
    """Every choice of a fine-tuning run; written to ``finetune_args.json`` so a run can be resumed."""

    model: str
    output: str
    teacher: str | None = None
    data: list[str] = field(default_factory=lambda: ["hub"])
    train_split: str = "train-clean-100"
    max_samples: int | None = None
    max_seconds: float | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-5
    batch_size: int = 8
    grad_accum: int = 2
    warmup_steps: float = 500
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    freeze: str = "feature-encoder"
    distill_weight: float = 1.0
    distill_only: bool = False
    temperature: float = 1.0
    eval_data: str | None = None
    eval_split: str = "dev-clean"
    eval_samples: int | None = 100
    eval_steps: int = 500
    eval_batch_size: int = 8
    early_stopping_patience: int = 3
    save_total_limit: int | None = 2
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    device: str = "auto"
    seed: int = 42
    test_data: str | None = None
    test_splits: list[str] = field(default_factory=lambda: list(EVALUATION_SPLITS))
    test_limit: int | None = None
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ checks


def parse_test_splits(values: Sequence[str]) -> list[str]:
    """``--test-splits``: LibriSpeech subsets for the final evaluation; ``none`` (or nothing) skips it."""
    values = list(values)
    if [value.lower() for value in values] in ([], ["none"]):
        return []
    if any(value.lower() == "none" for value in values):
        raise FinetuneError(f"--test-splits none skips the final evaluation: give it alone (got {' '.join(values)})")
    return [check_split(value) for value in values]


def check_config(config: FinetuneConfig) -> None:
    """Everything that can be refused before a model is loaded, as one-line errors."""
    check_settings(config)
    output = Path(config.output)
    if config.resume:
        if not output.is_dir():
            raise FinetuneError(f"--resume: {output} does not exist; start the run without --resume")
    elif output.exists() and not _holds_only_start_model(output, config.model):
        raise FinetuneError(f"{output} already exists; pass --resume to continue that run, or choose another --output")


def _holds_only_start_model(output: Path, model: str) -> bool:
    """``output`` holds nothing but the run's own start model (``mla-convert train`` writes the
    untrained model to ``<output>/initial`` and trains it there): a fresh run, not a resumed one."""
    start = Path(model).expanduser()
    if not start.is_dir() or start.resolve().parent != output.resolve():
        return False
    return all(entry.name == start.name for entry in output.iterdir())


def check_settings(config: FinetuneConfig) -> None:
    """The checks of the settings themselves (not of the output directory), as one-line errors."""
    config.test_splits = parse_test_splits(config.test_splits)
    if config.lr <= 0 or not math.isfinite(config.lr):
        raise FinetuneError(f"--lr must be a positive number (got {config.lr})")
    for name in ("batch_size", "grad_accum", "eval_steps", "logging_steps", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(config, name)})")
    if config.max_steps is not None and config.max_steps < 1:
        raise FinetuneError(f"--max-steps must be at least 1 (got {config.max_steps})")
    if config.max_samples is not None and config.max_samples < 1:
        raise FinetuneError(f"--max-samples must be at least 1 (got {config.max_samples})")
    if config.max_seconds is not None and config.max_seconds <= 0:
        raise FinetuneError(f"--max-seconds must be positive (got {config.max_seconds})")
    if config.epochs <= 0:
        raise FinetuneError(f"--epochs must be positive (got {config.epochs})")
    if config.freeze not in FREEZE_CHOICES:
        raise FinetuneError(f"--freeze {config.freeze!r}: choose from {', '.join(FREEZE_CHOICES)}")
    if config.precision not in ("auto", "fp32", "fp16", "bf16"):
        raise FinetuneError(f"--precision {config.precision!r}: choose from auto, fp32, fp16, bf16")
    if config.distill_weight < 0 or config.temperature <= 0:
        raise FinetuneError("--distill-weight must be >= 0 and --temperature > 0")
    if config.distill_only and not config.teacher:
        raise FinetuneError("--distill-only needs --teacher (the model whose outputs are distilled)")
    if config.lr_scheduler not in LR_SCHEDULERS:
        raise FinetuneError(f"--lr-scheduler {config.lr_scheduler!r}: choose from {', '.join(LR_SCHEDULERS)}")
    if not config.data:
        raise FinetuneError("give training data with --data hub|PATH")


def check_resume_args(config: FinetuneConfig) -> None:
    path = Path(config.output) / ARGS_FILE
    if not path.is_file():
        raise FinetuneError(f"--resume: {path} is missing; {config.output} is not a fine-tuning run directory")
    previous = json.loads(path.read_text(encoding="utf-8"))
    current = config.to_dict()
    # a setting added since the run started was its default then
    defaults = {f.name: f.default for f in fields(FinetuneConfig) if f.default is not MISSING}
    changed = sorted(
        k for k in current if k not in RESUME_MAY_CHANGE and previous.get(k, defaults.get(k)) != current[k]
    )
    if changed:
        name = changed[0]
        raise FinetuneError(
            f"--resume with different settings ({', '.join(changed)}; e.g. {name} was {previous.get(name)!r}, "
            f"now {current[name]!r}): resume with the original command"
        )
