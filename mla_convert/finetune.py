"""Fine-tune a (converted) speech model with ``transformers.Trainer``, optionally distilling from the original.

A conversion below the lossless rank costs accuracy; a short fine-tune wins it back. This module
is model-agnostic: anything :func:`mla_convert.evaluate.load_asr_model` loads (a CTC model or a
speech sequence-to-sequence model, converted or not) trains here, through the same data module as
evaluation (:mod:`mla_convert.data`: soundfile decoding, resampling, the Hub stream).

The loss is the task loss (CTC, or token cross-entropy teacher-forced on the transcript) plus
``distill_weight`` times the KL divergence from the unconverted teacher's output distribution
to the student's, on the same inputs (per frame for CTC, per target token for seq2seq). With
``distill_only`` no transcript is needed: CTC distils frame by frame, and a seq2seq student is
teacher-forced on the teacher's own greedy transcript of the audio.

Run directory (``output``)::

    output/                     the fine-tuned model (best by dev WER), processor, remote code,
                                evaluation.json and finetune_summary.json, written last
    output/checkpoints/         Trainer checkpoints (resume from the newest complete one)
    output/runs/                TensorBoard logs
    output/finetune_args.json   the resolved settings; --resume refuses different ones
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import (
    SPLITS,
    DataError,
    check_split,
    decode_audio,
    iter_folder_index,
    iter_local_index,
    librispeech,
    local_split_dir,
    resolve_source,
)
from .errors import MlaConvertError

logger = logging.getLogger(__name__)

FREEZE_CHOICES = ("feature-encoder", "non-attention", "none")
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
    test_splits: list[str] = field(default_factory=lambda: ["test-clean", "test-other"])
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
    if not config.data:
        raise FinetuneError("give training data with --data hub|PATH")
    output = Path(config.output)
    if config.resume:
        if not output.is_dir():
            raise FinetuneError(f"--resume: {output} does not exist; start the run without --resume")
    elif output.exists():
        raise FinetuneError(f"{output} already exists; pass --resume to continue that run, or choose another --output")


def _check_resume_args(config: FinetuneConfig) -> None:
    path = Path(config.output) / ARGS_FILE
    if not path.is_file():
        raise FinetuneError(f"--resume: {path} is missing; {config.output} is not a fine-tuning run directory")
    previous = json.loads(path.read_text(encoding="utf-8"))
    current = config.to_dict()
    changed = sorted(k for k in current if k not in RESUME_MAY_CHANGE and previous.get(k) != current[k])
    if changed:
        name = changed[0]
        raise FinetuneError(
            f"--resume with different settings ({', '.join(changed)}; e.g. {name} was {previous.get(name)!r}, "
            f"now {current[name]!r}): resume with the original command"
        )


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


# -------------------------------------------------------------------------------------------- data


def _is_librispeech_root(path: Path, split: str) -> bool:
    try:
        local_split_dir(path, split)
        return True
    except DataError:
        return False


def _looks_like_librispeech_root(path: Path) -> bool:
    """A folder holding LibriSpeech subset folders (any split): read by split, never wholesale."""
    return any((base / name).is_dir() for base in (path, path / "LibriSpeech") for name in SPLITS)


def index_rows(sources: Sequence[str], split: str, *, transcribed: bool = True) -> list[dict]:
    """Index rows (audio undecoded) of local sources: a LibriSpeech root (its ``split``), or any folder
    of transcribed audio (a LibriSpeech subset such as ``dev-clean`` itself, ``transcripts.tsv``)."""
    rows: list[dict] = []
    for source in sources:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FinetuneError(f"training data {source!r} does not exist (give hub, a LibriSpeech root, or a folder)")
        try:
            # a LibriSpeech root without the split is an error (naming the subsets it has), not
            # permission to train on every transcript below it, test sets included
            found = (
                list(iter_local_index(path, split))
                if _looks_like_librispeech_root(path)
                else list(iter_folder_index(path, transcribed=transcribed))
            )
        except DataError as error:
            raise FinetuneError(f"training data {source}: {error}") from None
        if not found:
            raise FinetuneError(f"no utterances in {source}")
        rows.extend({**row, "source": str(path)} for row in found)
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise FinetuneError(f"utterance {duplicate} appears twice in the training data")
    return rows


def audio_seconds(row: dict) -> float:
    """Duration from the file header (no decoding)."""
    import soundfile

    return float(soundfile.info(row["audio"]["path"]).duration)


class AudioRows(torch.utils.data.Dataset):
    """Map-style dataset over index rows; audio is decoded on access by the data module's decoder."""

    def __init__(self, rows: Sequence[dict], sampling_rate: int) -> None:
        self.rows = list(rows)
        self.sampling_rate = sampling_rate

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {"id": row["id"], "text": row["text"], "audio": decode_audio(row["audio"], self.sampling_rate)}


def training_data(config: FinetuneConfig, sampling_rate: int, labelled: bool):
    """``(dataset, size or None)``: a map-style dataset of local rows, or the Hub stream (size unknown)."""
    if list(config.data) == ["hub"]:
        dataset = librispeech(config.train_split, "hub", sampling_rate)
        if config.max_samples:
            dataset = dataset.take(config.max_samples)
        if config.max_seconds:
            dataset = dataset.filter(lambda row: row["duration"] <= config.max_seconds)
        return dataset.select_columns(["id", "text", "audio"]), config.max_samples
    if "hub" in config.data:
        raise FinetuneError("--data hub cannot be mixed with local folders in one run")
    rows = index_rows(config.data, config.train_split, transcribed=labelled)
    if config.max_seconds:
        rows = [row for row in rows if audio_seconds(row) <= config.max_seconds]
        if not rows:
            raise FinetuneError(f"no training utterance is at most --max-seconds {config.max_seconds} long")
    if config.max_samples:
        rows = rows[: config.max_samples]
    return AudioRows(rows, sampling_rate), len(rows)


def dev_rows(config: FinetuneConfig, train_rows: list[dict] | None, sampling_rate: int) -> tuple[list[dict], list]:
    """``(decoded dev utterances for model selection, training rows without them)``.

    ``eval_data``: ``none`` (no model selection), a folder / LibriSpeech root (its ``eval_split``)
    or ``hub``. Unset: ``eval_split`` of the training LibriSpeech root (or the Hub) when that is
    not the training split, else every fifth training utterance is held out.
    """
    limit = config.eval_samples
    choice = config.eval_data
    if choice == "none":
        return [], train_rows
    if choice is None:
        roots = [s for s in config.data if s == "hub" or _is_librispeech_root(Path(s).expanduser(), config.eval_split)]
        if config.eval_split != config.train_split and roots:
            choice = roots[0]
    if choice is None:
        if not train_rows:
            return [], train_rows
        held = train_rows[4::5][:limit] if limit else train_rows[4::5]
        held_ids = {row["id"] for row in held}
        rest = [row for row in train_rows if row["id"] not in held_ids]
        logger.info("model selection on %d utterances held out of the training data", len(held))
        return [{**row, "audio": decode_audio(row["audio"], sampling_rate)} for row in held], rest
    if choice == "hub":
        rows = list(librispeech(config.eval_split, "hub", sampling_rate, limit=limit))
    else:
        rows = index_rows([choice], config.eval_split)[:limit]
        rows = [{**row, "audio": decode_audio(row["audio"], sampling_rate)} for row in rows]
    held_ids = {row["id"] for row in rows}
    if train_rows is not None:
        overlap = [row for row in train_rows if row["id"] in held_ids]
        if overlap:
            logger.warning("%d dev utterances removed from the training data", len(overlap))
            train_rows = [row for row in train_rows if row["id"] not in held_ids]
    return rows, train_rows


def label_text(text: str, tokenizer: Any, kind: str) -> str:
    """A transcript in the writing style the model's vocabulary expects.

    LibriSpeech writes upper case without punctuation. A CTC vocabulary of single letters is
    either upper or lower case: match it. Whisper-style seq2seq models write cased text: an
    all-caps transcript becomes sentence case, so training does not teach the model to shout
    (the evaluation normaliser lower-cases anyway).
    """
    if kind == "ctc":
        if getattr(tokenizer, "do_lower_case", False):
            return text.lower()
        letters = [token for token in tokenizer.get_vocab() if len(token) == 1 and token.isalpha()]
        if letters and all(token.isupper() for token in letters):
            return text.upper()
        if letters and all(token.islower() for token in letters):
            return text.lower()
        return text
    if text.isupper():
        text = text.lower()
        return text[:1].upper() + text[1:]
    return text


@dataclass
class SpeechCollator:
    """Audio + transcript rows → model inputs (the model's own feature extractor and tokenizer)."""

    kind: str
    feature_extractor: Any
    tokenizer: Any
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None
    labelled: bool = True
    pass_attention_mask: bool = True
    max_label_length: int | None = None
    window_samples: int | None = None
    skipped_long: int = 0

    @property
    def sampling_rate(self) -> int:
        return int(getattr(self.feature_extractor, "sampling_rate", 16000) or 16000)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.window_samples:  # fixed-window models (Whisper: 30 s) would learn from a cut-off utterance
            kept = [row for row in rows if len(row["audio"]) <= self.window_samples]
            self.skipped_long += len(rows) - len(kept)
            rows = kept or rows[:1]
        audios = [np.asarray(row["audio"], dtype=np.float32) for row in rows]
        if self.kind == "ctc":
            batch = self._ctc(audios)
        else:
            batch = dict(self.feature_extractor(audios, sampling_rate=self.sampling_rate, return_tensors="pt"))
            batch.pop("attention_mask", None)
        batch["sample_lengths"] = torch.tensor([len(a) for a in audios])
        if self.labelled:
            texts = [label_text(row["text"], self.tokenizer, self.kind) for row in rows]
            batch.update(self.ctc_labels(texts) if self.kind == "ctc" else self.seq2seq_labels(texts))
        return batch

    def _ctc(self, audios: list[np.ndarray]) -> dict[str, torch.Tensor]:
        batch = dict(
            self.feature_extractor(
                audios, sampling_rate=self.sampling_rate, padding=True, return_attention_mask=True, return_tensors="pt"
            )
        )
        if not self.pass_attention_mask:
            batch.pop("attention_mask", None)
        return batch

    def ctc_labels(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt", return_attention_mask=True)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return {"labels": labels}

    def seq2seq_labels(self, texts: list[str]) -> dict[str, torch.Tensor]:
        sequences = [self.tokenizer(text).input_ids for text in texts]
        return self.teacher_forcing(sequences)

    def teacher_forcing(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """``labels`` (-100 padded) and ``decoder_input_ids`` (labels shifted right behind the start token)."""
        start, pad = int(self.decoder_start_token_id), int(self.pad_token_id)
        targets = []
        for ids in sequences:
            ids = list(ids)
            if ids and ids[0] == start:  # the model's start token is the decoder's first input, not a target
                ids = ids[1:]
            if self.max_label_length:
                ids = ids[: self.max_label_length]
            targets.append(ids)
        width = max(len(ids) for ids in targets)
        labels = torch.full((len(targets), width), -100, dtype=torch.long)
        decoder_inputs = torch.full((len(targets), width), pad, dtype=torch.long)
        for row, ids in enumerate(targets):
            labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            decoder_inputs[row, : len(ids)] = torch.tensor([start, *ids[:-1]], dtype=torch.long)
        return {"labels": labels, "decoder_input_ids": decoder_inputs}


# ------------------------------------------------------------------------------------------- losses


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over unmasked positions of KL(teacher ‖ student) at ``temperature``, times T² (Hinton et al.)
    so its gradient scale does not depend on the temperature. Exactly zero when the logits agree."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    if mask is None:
        mask = torch.ones_like(per_position)
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0) * temperature**2


def ctc_frame_mask(model: nn.Module, sample_lengths: torch.Tensor, frames: int) -> torch.Tensor | None:
    """``(batch, frames)``: True on the output frames that cover real (unpadded) audio."""
    lengths_of = getattr(model, "_get_feat_extract_output_lengths", None)
    if lengths_of is None:
        return None
    lengths = torch.as_tensor(lengths_of(sample_lengths)).to(sample_lengths.device)
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


# ------------------------------------------------------------------------------------------ freezing


def _converted_attention_modules(model: nn.Module) -> list[nn.Module]:
    from .modeling.attention_base import ConvertedAttention

    found = [m for m in model.modules() if isinstance(m, ConvertedAttention) or _is_remote_converted(m)]
    if found:
        return found
    return [m for name, m in model.named_modules() if type(m).__name__.endswith("Attention") and name]


def _is_remote_converted(module: nn.Module) -> bool:
    # loaded with trust_remote_code, the class comes from the checkpoint's copy of attention_base.py
    return any(base.__name__ == "ConvertedAttention" for base in type(module).__mro__)


def apply_freeze(model: nn.Module, freeze: str) -> dict[str, int]:
    """Freeze part of the model; returns trainable / total parameter counts."""
    if freeze == "non-attention":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for module in _converted_attention_modules(model):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    elif freeze == "feature-encoder":
        if hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
        else:  # Whisper-style: the convolutional front-end of the encoder
            encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
            for name in ("conv1", "conv2", "embed_positions"):
                module = getattr(encoder, name, None)
                if isinstance(module, nn.Module):
                    for parameter in module.parameters():
                        parameter.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise FinetuneError(f"--freeze {freeze} leaves no parameter to train in this model")
    return {"trainable_parameters": trainable, "total_parameters": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------------------ precision


def choose_precision(requested: str, device: torch.device) -> str:
    """fp16 on CUDA (bf16 where the GPU supports it), fp32 on the CPU, unless asked otherwise."""
    if requested != "auto":
        if requested in ("fp16", "bf16") and device.type != "cuda":
            raise FinetuneError(f"--precision {requested} needs a CUDA device (this run is on {device.type})")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# -------------------------------------------------------------------------------------------- trainer


class NonFiniteLossError(FinetuneError):
    """The training loss became NaN or infinite (a learning rate too high, fp16 overflow...)."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"the training loss became {value} at step {step + 1}")
        self.step = step


def _trainer_class():
    from transformers import Trainer

    class SpeechTrainer(Trainer):
        """``Trainer`` with distillation from a frozen teacher, dev-set WER as its evaluation, and a
        hard stop on a non-finite loss (before the optimizer can write it into the weights)."""

        def __init__(self, *args, finetune: FinetuneRun, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.run = finetune
            # compute_loss returns a per-batch mean: let Trainer divide by the accumulation steps
            self.model_accepts_loss_kwargs = False
            self._parts: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs, parts = self.run.loss(model, inputs)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(self.state.global_step, float(loss.detach()))
            if model.training:
                self.run.samples_seen += int(inputs["sample_lengths"].shape[0])
                for name, value in parts.items():
                    self._parts.setdefault(name, []).append(value)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                for name, values in self._parts.items():
                    logs[name] = float(np.mean(values))
                self._parts = {}
                logs["samples_seen"] = self.run.samples_seen
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
            metrics = self.run.dev_metrics(self.model, metric_key_prefix)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return SpeechTrainer


def _progress_callback(run: FinetuneRun):
    """Writes the run's own progress into each checkpoint as soon as Trainer has saved it (the
    first ``on_save`` callback): a checkpoint without that file is incomplete."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / PROGRESS_FILE).write_text(json.dumps(run.progress_state(), indent=2))
            return control

    return ProgressCallback()


@dataclass
class FinetuneRun:
    """The loaded pieces of one run, and the loss that ties student and teacher together."""

    config: FinetuneConfig
    kind: str
    student: Any  # ASRModel
    teacher: Any | None  # ASRModel
    collator: SpeechCollator
    dev: list[dict]
    shared_encoder: bool = False
    samples_seen: int = 0
    train_seconds: float = 0.0
    dev_history: list[dict] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)

    @property
    def distilling(self) -> bool:
        return self.teacher is not None and (self.config.distill_weight > 0 or self.config.distill_only)

    def progress_state(self) -> dict[str, Any]:
        return {
            "samples_seen": self.samples_seen,
            "train_seconds": self.train_seconds + (time.perf_counter() - self._started),
            "skipped_long": self.collator.skipped_long,
            "dev_history": self.dev_history,
        }

    def restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / PROGRESS_FILE).read_text(encoding="utf-8"))
        self.samples_seen = int(state["samples_seen"])
        self.train_seconds = float(state["train_seconds"])
        self.collator.skipped_long = int(state.get("skipped_long", 0))
        self.dev_history = list(state.get("dev_history", []))

    # ---- loss

    def _pseudo_labels(self, inputs: dict[str, torch.Tensor], sample_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forcing targets from the teacher's own greedy transcript (seq2seq, no labels)."""
        seconds = float(sample_lengths.max()) / self.collator.sampling_rate
        prepared = {"inputs": {"input_features": inputs["input_features"]}, "max_seconds": seconds}
        texts = self.teacher.transcribe(prepared).texts
        labels = self.collator.seq2seq_labels([text.strip() for text in texts])
        device = inputs["input_features"].device
        return {name: value.to(device) for name, value in labels.items()}

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        inputs = dict(inputs)
        sample_lengths = inputs.pop("sample_lengths")
        if self.config.distill_only:
            inputs.pop("labels", None)
            if self.kind == "seq2seq":
                inputs.update(self._pseudo_labels(inputs, sample_lengths))
        labels = inputs.get("labels")
        student_inputs = dict(inputs)
        if self.config.distill_only:
            student_inputs.pop("labels", None)
        outputs = model(**student_inputs)
        parts: dict[str, float] = {}
        loss = outputs.loss if (outputs.loss is not None and not self.config.distill_only) else None
        if loss is not None:
            parts["task_loss"] = float(loss.detach())
        if self.distilling:
            with torch.no_grad():
                teacher_logits = self._teacher_logits(inputs, outputs)
            if self.kind == "ctc":
                mask = ctc_frame_mask(model, sample_lengths.to(outputs.logits.device), outputs.logits.shape[1])
            else:
                mask = labels != -100
            kd = distillation_loss(outputs.logits, teacher_logits, mask, self.config.temperature)
            parts["distill_loss"] = float(kd.detach())
            weight = 1.0 if self.config.distill_only else self.config.distill_weight
            loss = weight * kd if loss is None else loss + weight * kd
        if loss is None:
            raise FinetuneError("the model returned no loss: give transcribed data, or --teacher with --distill-only")
        return loss, outputs, parts

    def _teacher_logits(self, inputs: dict[str, torch.Tensor], outputs) -> torch.Tensor:
        teacher = self.teacher.model
        if self.kind == "ctc":
            kwargs = {k: v for k, v in inputs.items() if k in ("input_values", "attention_mask")}
            return teacher(**kwargs).logits
        kwargs = {"decoder_input_ids": inputs["decoder_input_ids"]}
        encoded = getattr(outputs, "encoder_last_hidden_state", None)
        if self.shared_encoder and encoded is not None:
            from transformers.modeling_outputs import BaseModelOutput

            kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoded.detach())
        else:
            kwargs["input_features"] = inputs["input_features"]
        return teacher(**kwargs).logits

    # ---- model selection

    def dev_metrics(self, model: nn.Module, prefix: str = "eval") -> dict[str, float]:
        """WER of the model being trained on the dev utterances, through the evaluation code path."""
        from dataclasses import replace

        from .evaluate import totals, utterance_records

        if not self.dev:
            return {}
        started = time.perf_counter()
        asr = replace(self.student, model=model)
        was_training = model.training
        model.eval()
        use_cache = getattr(model.config, "use_cache", None)
        if use_cache is not None:
            model.config.use_cache = True
        records: list[dict] = []
        try:
            ordered = sorted(self.dev, key=lambda row: len(row["audio"]))
            size = self.config.eval_batch_size
            for start in range(0, len(ordered), size):
                batch = ordered[start : start + size]
                result = asr.transcribe(asr.prepare([row["audio"] for row in batch]))
                records.extend(utterance_records(asr, batch, result, "dev", 0.0))
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache
            model.train(was_training)
        summary = totals(records)
        metrics = {f"{prefix}_wer": float(summary["wer"] or 0.0), f"{prefix}_utterances": summary["utterances"]}
        if summary["generation_limit_hits"] is not None:
            metrics[f"{prefix}_generation_limit_hits"] = summary["generation_limit_hits"]
        metrics[f"{prefix}_seconds"] = round(time.perf_counter() - started, 2)
        self.dev_history.append({"samples_seen": self.samples_seen, "wer": metrics[f"{prefix}_wer"]})
        return metrics


def _same_vocabulary(student, teacher) -> str | None:
    """Why the teacher cannot be distilled into the student, or None."""
    s_size, t_size = student.model.config.vocab_size, teacher.model.config.vocab_size
    if s_size != t_size:
        return f"{t_size} output tokens against the student's {s_size}"
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        return "the same number of tokens but a different tokenizer vocabulary"
    return None


def _encoders_identical(student: nn.Module, teacher: nn.Module) -> bool:
    """Frozen and equal encoders: the teacher can reuse the student's encoder output (seq2seq only)."""
    if not (hasattr(student, "get_encoder") and hasattr(teacher, "get_encoder")):
        return False
    mine, theirs = student.get_encoder(), teacher.get_encoder()
    if any(p.requires_grad for p in mine.parameters()):
        return False
    ours, other = mine.state_dict(), theirs.state_dict()
    return ours.keys() == other.keys() and all(torch.equal(ours[k], other[k].to(ours[k].device)) for k in ours)


# ---------------------------------------------------------------------------------------------- run


def _check_test_disjoint(config: FinetuneConfig, train_ids: set[str]) -> None:
    """Refuse training data that shares utterance ids with the test splits evaluated at the end."""
    if not config.test_splits or not train_ids:
        return
    try:
        source = resolve_source(config.test_data, check_hub=False)
    except DataError as error:
        raise FinetuneError(f"test data: {error}") from None
    if source == "hub":
        return
    for split in config.test_splits:
        try:
            test_ids = {row["id"] for row in iter_local_index(source, split)}
        except DataError as error:
            raise FinetuneError(f"test data: {error}") from None
        overlap = sorted(train_ids & test_ids)
        if overlap:
            raise FinetuneError(
                f"the training data shares {len(overlap)} utterances with {split} (e.g. {overlap[0]}): "
                "a fine-tuned model is never evaluated on what it was trained on"
            )


def _training_arguments(config: FinetuneConfig, precision: str, device: torch.device, selecting: bool, steps: int):
    from transformers import TrainingArguments

    # transformers 5.x renamed gradient_checkpointing (the old name warns)
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    warmup = config.warmup_steps
    if warmup >= 1 and steps and warmup >= steps:
        logger.warning(
            "--warmup-steps %s >= the %d training steps: the learning rate never reaches --lr", warmup, steps
        )
    return TrainingArguments(
        output_dir=str(Path(config.output) / CHECKPOINTS),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or steps or -1,
        warmup_steps=int(warmup) if warmup >= 1 else warmup,
        lr_scheduler_type="linear",
        eval_strategy="steps" if selecting else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=selecting,
        metric_for_best_model="wer" if selecting else None,
        greater_is_better=False if selecting else None,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        report_to="none",
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=device.type == "cpu",
        **{checkpointing: config.gradient_checkpointing},
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=not config.progress,
        restore_callback_states_from_checkpoint=True,
    )


def _tensorboard_callback(log_dir: Path):
    from transformers.integrations import TensorBoardCallback

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logger.warning("neither tensorboard nor tensorboardX is installed: no TensorBoard logs")
            return None
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def _planned_steps(config: FinetuneConfig, size: int | None) -> int | None:
    """Optimizer steps of the run, when the dataset size is known (a stream needs --max-steps)."""
    if config.max_steps:
        return config.max_steps
    if size is None:
        return None
    per_epoch = max(1, math.ceil(math.ceil(size / config.batch_size) / config.grad_accum))
    return max(1, math.ceil(per_epoch * config.epochs))


def _drop_checkpoints_from(checkpoints: Path, step: int) -> list[str]:
    """Remove checkpoints whose weights produced the non-finite loss (saved at ``step`` or later)."""
    removed = []
    for path in sorted(checkpoints.glob("checkpoint-*")):
        number = path.name.removeprefix("checkpoint-")
        if number.isdigit() and int(number) >= step:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _save_final_model(run: FinetuneRun, model: nn.Module, model_path: str, output: Path) -> None:
    """Model + processor into ``output`` (beside checkpoints/ and runs/), staged then moved in."""
    from .checkpoint import save_processor

    staging = output / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if getattr(model.config, "use_cache", None) is False:
            model.config.use_cache = True
        model.save_pretrained(staging)
        if not save_processor(model_path, staging):
            run.student.feature_extractor.save_pretrained(staging)
            run.student.tokenizer.save_pretrained(staging)
        report = Path(model_path) / "conversion_report.json"
        if report.is_file():
            shutil.copy2(report, staging / report.name)
        for entry in staging.iterdir():
            entry.replace(output / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_data(config: FinetuneConfig) -> str:
    """Check that the training data (and the test data of the final evaluation) can be read, without
    loading a model; one-line errors. Returns what was found, for ``mla-convert finetune --check-data``
    (recipes run it before converting)."""
    config.test_splits = parse_test_splits(config.test_splits)
    if not config.data:
        raise FinetuneError("give training data with --data hub|PATH")
    if list(config.data) != ["hub"]:
        if "hub" in config.data:
            raise FinetuneError("--data hub cannot be mixed with local folders in one run")
        rows = index_rows(config.data, config.train_split, transcribed=not config.distill_only)
        found = f"{len(rows)} training utterances in {', '.join(config.data)}"
    else:
        resolve_source("hub")
        found = f"training data: the Hub's {config.train_split}"
    if config.test_splits:
        source = resolve_source(config.test_data)
        if str(source) != "hub":
            for split in config.test_splits:
                local_split_dir(source, split)  # one-line DataError naming the subsets it has
        found += f"; final evaluation on {', '.join(config.test_splits)} of {source}"
    else:
        found += "; no final evaluation (--test-splits none)"
    return found


def finetune(config: FinetuneConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Fine-tune ``config.model``, keep the best checkpoint by dev WER, evaluate, and summarise.

    Returns the summary written to ``<output>/finetune_summary.json``. ``callbacks`` are extra
    ``TrainerCallback`` objects (progress hooks, tests).
    """
    from .evaluate import resolve_device
    from .io import transformers_progress_bars

    check_config(config)
    if config.resume:
        _check_resume_args(config)
    # data first: a missing folder or an unreachable Hub is reported before minutes of model loading,
    # and the test data before hours of training
    check_data(config)
    device = resolve_device(config.device)
    choose_precision(config.precision, device)
    with transformers_progress_bars(config.progress):  # --quiet: no loading / shard-writing bars either
        return _finetune(config, device, callbacks)


def _finetune(config: FinetuneConfig, device: torch.device, callbacks: Sequence[Any]) -> dict[str, Any]:
    from .evaluate import load_asr_model

    output = Path(config.output)
    labelled = not config.distill_only
    precision = choose_precision(config.precision, device)
    student = load_asr_model(config.model, device)
    teacher = load_asr_model(config.teacher, device) if config.teacher else None
    if teacher is not None:
        if teacher.kind != student.kind:
            raise FinetuneError(f"teacher {config.teacher} is a {teacher.kind} model; the student is {student.kind}")
        why = _same_vocabulary(student, teacher)
        if why is not None:
            raise FinetuneError(f"teacher {config.teacher} has a different vocabulary ({why}): distillation "
                                "compares output distributions token by token")  # fmt: skip
        teacher.model.requires_grad_(False)
    model = student.model
    if student.kind == "ctc":
        # per-utterance mean (not the checkpoints' "sum") keeps the CTC loss on the scale of the KL term;
        # zero_infinity: an utterance shorter than its transcript gives no gradient instead of inf
        model.config.ctc_loss_reduction = "mean"
        model.config.ctc_zero_infinity = True
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    counts = apply_freeze(model, config.freeze)
    sampling_rate = student.sampling_rate

    train_dataset, size = training_data(config, sampling_rate, labelled)
    train_rows = train_dataset.rows if isinstance(train_dataset, AudioRows) else None
    dev, train_rows = dev_rows(config, train_rows, sampling_rate)
    if train_rows is not None:
        if not train_rows:
            raise FinetuneError("no training utterances left after holding out the dev set")
        train_dataset, size = AudioRows(train_rows, sampling_rate), len(train_rows)
        _check_test_disjoint(config, {row["id"] for row in train_rows})
    steps = _planned_steps(config, size)
    if steps is None:
        raise FinetuneError("streaming from the Hub: give --max-steps or --max-samples (the stream has no length)")
    for row in dev:
        row["duration"] = len(row["audio"]) / sampling_rate

    generation = getattr(model, "generation_config", None)
    config_start = getattr(model.config, "decoder_start_token_id", None)
    collator = SpeechCollator(
        kind=student.kind,
        feature_extractor=student.feature_extractor,
        tokenizer=student.tokenizer,
        decoder_start_token_id=getattr(generation, "decoder_start_token_id", None) or config_start,
        pad_token_id=getattr(model.config, "pad_token_id", None),
        labelled=labelled,
        pass_attention_mask=student.uses_attention_mask,
        max_label_length=getattr(model.config, "max_target_positions", None),
        window_samples=getattr(student.feature_extractor, "n_samples", None),
    )
    run = FinetuneRun(config, student.kind, student, teacher, collator, dev)
    if teacher is not None and student.kind == "seq2seq":
        run.shared_encoder = _encoders_identical(model, teacher.model)

    checkpoint = last_complete_checkpoint(output / CHECKPOINTS) if config.resume else None
    if config.resume and (output / TRAINED_FILE).is_file():
        trained = json.loads((output / TRAINED_FILE).read_text(encoding="utf-8"))
        logger.warning("--resume: training had finished (%d steps); going on to the evaluation", trained["steps"])
    else:
        if config.resume and checkpoint is None:
            logger.warning("--resume: no complete checkpoint in %s; training starts from step 0", output / CHECKPOINTS)
        if checkpoint is not None:
            run.restore(checkpoint)
            logger.warning("resuming from %s", checkpoint)
        output.mkdir(parents=True, exist_ok=True)
        (output / ARGS_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        trained = _train(run, model, train_dataset, steps, precision, device, checkpoint, callbacks, counts)
        trained = {**trained, "device": describe_device(device), "precision": precision, **counts}
        trained["stopped_early"] = trained["steps"] < steps
        _save_final_model(run, model, student.path, output)
        (output / TRAINED_FILE).write_text(json.dumps(trained, indent=2))
    student.close()
    if teacher is not None:
        teacher.close()
    return _evaluate_and_summarise(config, trained, size)


def _train(run, model, dataset, steps, precision, device, checkpoint, callbacks, counts) -> dict[str, Any]:
    from transformers import EarlyStoppingCallback, set_seed

    config = run.config
    set_seed(config.seed)
    selecting = bool(run.dev)
    args = _training_arguments(config, precision, device, selecting, steps)
    extra = [_progress_callback(run), *callbacks]  # progress first: other on_save hooks see a complete checkpoint
    board = _tensorboard_callback(Path(config.output) / "runs")
    if board is not None:
        extra.append(board)
    if selecting and config.early_stopping_patience > 0:
        extra.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=run.dev or None,
        data_collator=run.collator,
        callbacks=extra,
        finetune=run,
    )
    mode = {"fp32": "fp32", "fp16": "fp16 mixed precision", "bf16": "bf16 mixed precision"}[precision]
    logger.warning(
        "training %s in %s on %s: %d steps of %d x %d utterances, %s of %s parameters trainable (--freeze %s)%s",
        run.student.model_id, mode, describe_device(device), steps, config.batch_size, config.grad_accum,
        f"{counts['trainable_parameters']:,}", f"{counts['total_parameters']:,}", config.freeze,
        f"; distilling from {config.teacher}" + (" (shared encoder output)" if run.shared_encoder else "")
        if run.distilling else "",
    )  # fmt: skip
    checkpoints = Path(config.output) / CHECKPOINTS
    started = time.perf_counter()
    run._started = started
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLossError as error:
        removed = _drop_checkpoints_from(checkpoints, error.step)
        good = last_complete_checkpoint(checkpoints)
        kept = f"last good checkpoint: {good}" if good else "no checkpoint was saved before it"
        dropped = f" (removed {', '.join(removed)}, whose weights give that loss)" if removed else ""
        raise FinetuneError(
            f"{error} (learning rate {config.lr}): training stopped; {kept}{dropped}; try a lower --lr"
        ) from None
    if board is not None and board.tb_writer is not None:
        board.tb_writer.close()
    state = trainer.state
    best = state.best_model_checkpoint
    resumed_from = int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else 0
    return {
        "steps": state.global_step,
        # Trainer's own train_loss covers only the steps of this process (after a resume: the resumed ones)
        "train_loss": mean_training_loss(state.log_history, state.global_step, resumed_from, result.training_loss),
        "planned_steps": steps,
        "epochs": round(float(state.epoch or 0.0), 4),
        "samples_seen": run.samples_seen,
        "skipped_over_window": run.collator.skipped_long,
        "train_seconds": round(run.train_seconds + time.perf_counter() - started, 1),
        "best_checkpoint": Path(best).name if best else None,
        "best_dev_wer": state.best_metric,
        "dev_history": run.dev_history,
        "shared_encoder": run.shared_encoder,
        "losses": [
            {k: v for k, v in entry.items() if k in ("step", "loss", "task_loss", "distill_loss", "learning_rate")}
            for entry in state.log_history
            if "loss" in entry
        ],
    }


def mean_training_loss(
    log_history: Sequence[dict[str, Any]],
    global_step: int,
    resumed_from: int = 0,
    resumed_loss: float | None = None,
) -> float | None:
    """The training loss averaged over every step of the run, an interrupted part included.

    Each logged ``loss`` is the mean over the steps since the previous log, so it is weighted by
    that span. ``resumed_loss`` is Trainer's ``train_loss`` of the last ``train()`` call, the mean over
    steps ``resumed_from + 1 .. global_step``; it supplies the steps after the last log. Steps that
    were neither logged nor trained in the last call (between a checkpoint and its last log) are
    left out of the average.
    """
    losses = sorted({int(e["step"]): float(e["loss"]) for e in log_history if "loss" in e and "step" in e}.items())
    total = covered = resumed_total = 0.0
    previous = 0
    for step, loss in losses:
        start = max(previous, resumed_from) if step > resumed_from else previous
        span = step - start
        if span <= 0:
            continue
        total += loss * span
        covered += span
        if step > resumed_from:
            resumed_total += loss * span
        previous = step
    if resumed_loss is not None and math.isfinite(resumed_loss) and global_step > max(previous, resumed_from):
        tail_start = max(previous, resumed_from)
        total += resumed_loss * (global_step - resumed_from) - resumed_total
        covered += global_step - tail_start
    if not covered:
        return None
    return total / covered


def _evaluate_and_summarise(config: FinetuneConfig, trained: dict[str, Any], size: int | None) -> dict[str, Any]:
    from .evaluate import evaluate_models

    output = Path(config.output)
    evaluation: dict[str, Any] = {}
    if config.test_splits:
        models = [config.model, str(output)] + ([config.teacher] if config.teacher else [])
        payload, _ = evaluate_models(
            models,
            config.test_splits,
            data=config.test_data,
            batch_size=config.eval_batch_size,
            limit=config.test_limit,
            output=output / EVALUATION_FILE,
            progress=config.progress,
        )
        roles = {config.model: "before", str(output): "after", config.teacher: "teacher"}
        for row in payload["results"]:
            entry = evaluation.setdefault(row["split"], {})
            entry[roles[row["model"]]] = row["wer"]
            if row.get("generation_limit_hits") is not None:
                entry[f"{roles[row['model']]}_generation_limit_hits"] = row["generation_limit_hits"]
    summary = {
        "model": config.model,
        "teacher": config.teacher,
        "output": str(output),
        "datasets": list(config.data) if list(config.data) != ["hub"] else [f"hub:{config.train_split}"],
        "training_utterances": size,
        "steps": trained["steps"],
        "epochs": trained["epochs"],
        "learning_rate": config.lr,
        "batch_size": config.batch_size,
        "gradient_accumulation": config.grad_accum,
        "freeze": config.freeze,
        "distill_weight": 0.0 if not config.teacher else (1.0 if config.distill_only else config.distill_weight),
        "distill_only": config.distill_only,
        **{k: v for k, v in trained.items() if k not in ("steps", "epochs", "losses", "dev_history")},
        "wer": evaluation,
        "dev_history": trained["dev_history"],
        "losses": trained["losses"],
    }
    path = output / SUMMARY_FILE
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(summary, indent=2))
    temporary.replace(path)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: WER before / after fine-tuning (and the teacher's) per test split."""
    lines = [
        f"fine-tuned {summary['model']} -> {summary['output']}: {summary['steps']} steps, "
        f"{summary['samples_seen']} utterances seen, {summary['train_seconds']} s on {summary['device']} "
        f"({summary['precision']})"
    ]
    if summary.get("train_loss") is not None:
        lines.append(f"mean training loss {summary['train_loss']:.4f} over all {summary['steps']} steps")
    if summary.get("best_checkpoint"):
        lines.append(f"best dev WER {100 * summary['best_dev_wer']:.2f}% at {summary['best_checkpoint']}")
    if summary["wer"]:
        lines += ["", "| split | teacher WER % | before WER % | after WER % |", "|---|---|---|---|"]
        for split, row in summary["wer"].items():
            cells = [f"{100 * row[k]:.2f}" if row.get(k) is not None else "-" for k in ("teacher", "before", "after")]
            lines.append(f"| {split} | {' | '.join(cells)} |")
    lines.append(f"summary: {Path(summary['output']) / SUMMARY_FILE}")
    return "\n".join(lines)
