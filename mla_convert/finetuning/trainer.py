"""The Trainer side of fine-tuning: losses, freezing, precision, the Trainer subclass, its callbacks and arguments."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import gather, is_distributed, own_class
from .batches import rank_stream
from .config import CHECKPOINTS, PROGRESS_FILE, FinetuneConfig, FinetuneError

if TYPE_CHECKING:
    from .run import FinetuneRun

logger = logging.getLogger(__name__)


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
    from ..modeling.attention_base import ConvertedAttention

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
    """``cuda (NAME)`` / ``cpu (N threads)``, and ``x W processes`` under a launcher."""
    from ..distributed import world_size

    if device.type == "cuda":
        described = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        described = f"cpu ({torch.get_num_threads()} threads)"
    return described + (f" x {world_size()} processes" if world_size() > 1 else "")


# -------------------------------------------------------------------------------------------- trainer


class NonFiniteLossError(FinetuneError):
    """The training loss became NaN or infinite (a learning rate too high, fp16 overflow...)."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"the training loss became {value} at step {step + 1}")
        self.step = step


def trainer_class():
    from transformers import Trainer

    class SpeechTrainer(Trainer):
        """``Trainer`` with distillation from a frozen teacher, dev-set WER as its evaluation, and a
        hard stop on a non-finite loss (before the optimizer can write it into the weights)."""

        # compute_loss returns a per-batch mean: let Trainer divide by the accumulation steps
        loss_is_scaled_for_ga = False

        def __init__(self, *args, finetune: FinetuneRun, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.run = finetune
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
            if "loss" in logs:  # every rank logs at the same steps: the parts are averaged over ranks
                gathered = gather(self._parts)
                for name in self._parts:
                    logs[name] = float(np.mean([value for part in gathered for value in part.get(name, [])]))
                self._parts = {}
                logs["samples_seen"] = self.run.seen_by_all_ranks()
            super().log(logs, start_time)

        def get_train_dataloader(self):
            """A streamed dataset under a launcher: each rank reads only its part of the stream
            (:func:`datasets.distributed.split_dataset_by_node`: whole shards when their count
            divides by the world size, else every W-th utterance). accelerate's preparation would
            shard it a second time, so the rank's loader is built here; Trainer moves batches to
            the device itself. Map-style datasets go through Trainer (accelerate gives rank r the
            batches r, r + W, ... of one shuffled order)."""
            dataset = self.train_dataset
            if not (is_distributed() and _is_stream(dataset)):
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            return DataLoader(
                rank_stream(dataset),
                batch_size=self._train_batch_size,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            """Checkpoints of an FSDP-sharded model carry the model's own source files (see
            :func:`~mla_convert.distributed.own_class`)."""
            with own_class(self.model):
                super().save_model(output_dir, _internal_call)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
            metrics = self.run.dev_metrics(self.model, metric_key_prefix)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return SpeechTrainer


def _is_stream(dataset) -> bool:
    try:
        from datasets import IterableDataset
    except ImportError:
        return False
    return isinstance(dataset, IterableDataset)


def progress_callback(run: FinetuneRun):
    """Writes the run's own progress into each checkpoint as soon as Trainer has saved it (the
    first ``on_save`` callback): a checkpoint without that file is incomplete. Under a launcher
    every rank reaches ``on_save`` after writing its part (its RNG state); the counters are summed
    over ranks there, and rank 0 then writes the file, so a checkpoint is complete only when every
    rank's part is in it."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            progress = run.progress_state()  # a collective: every rank calls it
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                (folder / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
            return control

    return ProgressCallback()


def training_arguments(config: FinetuneConfig, precision: str, device: torch.device, selecting: bool, steps: int):
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
        lr_scheduler_type=config.lr_scheduler,
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
        log_level_replica="error",  # under a launcher: Trainer's warnings from rank 0 only
        restore_callback_states_from_checkpoint=True,
    )


def tensorboard_callback(log_dir: Path):
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
