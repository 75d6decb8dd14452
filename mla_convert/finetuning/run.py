"""One fine-tuning run end to end: :class:`FinetuneRun` (loss, dev WER), data checks, training, resume."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DataError, local_split_dir, resolve_source, split_overlap
from ..distributed import (
    barrier,
    broadcast,
    device_for_rank,
    gather,
    init_process_group,
    is_main,
    rank,
    sum_over_ranks,
    world_size,
)
from .batches import AudioRows, SpeechCollator, dev_rows, index_rows, training_data
from .checkpoints import drop_checkpoints_from, last_complete_checkpoint, planned_steps, save_final_model
from .config import (
    ARGS_FILE,
    CHECKPOINTS,
    PROGRESS_FILE,
    TRAINED_FILE,
    FinetuneConfig,
    FinetuneError,
    check_config,
    check_resume_args,
    parse_test_splits,
)
from .summary import evaluate_and_summarise
from .trainer import (
    NonFiniteLossError,
    apply_freeze,
    choose_precision,
    ctc_frame_mask,
    describe_device,
    distillation_loss,
    progress_callback,
    tensorboard_callback,
    trainer_class,
    training_arguments,
)

logger = logging.getLogger(__name__)


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

    # Under a launcher each rank counts the utterances of its own batches; rank 0's counters also
    # hold what a resumed checkpoint had seen, so the run's totals are the sums over ranks.

    def seen_by_all_ranks(self) -> int:
        """Training utterances seen by every rank together (a collective under a launcher)."""
        return int(sum_over_ranks(self.samples_seen))

    def progress_state(self) -> dict[str, Any]:
        """What a checkpoint needs besides Trainer's state; every rank calls it (it sums their counters)."""
        return {
            "samples_seen": self.seen_by_all_ranks(),
            "train_seconds": self.train_seconds + (time.perf_counter() - self._started),
            "skipped_long": int(sum_over_ranks(self.collator.skipped_long)),
            "dev_history": self.dev_history,
            "world_size": world_size(),
        }

    def restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / PROGRESS_FILE).read_text(encoding="utf-8"))
        written_by = int(state.get("world_size", 1))
        if written_by != world_size():
            raise FinetuneError(
                f"--resume with {world_size()} process(es): {checkpoint.name} was written by a run of {written_by}; "
                "the data order and the global batch follow the number of processes, so resume with the "
                "original launch command"
            )
        first = is_main()
        self.samples_seen = int(state["samples_seen"]) if first else 0
        self.train_seconds = float(state["train_seconds"])
        self.collator.skipped_long = int(state.get("skipped_long", 0)) if first else 0
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
                lengths = _ctc_input_lengths(inputs, sample_lengths).to(outputs.logits.device)
                mask = ctc_frame_mask(model, lengths, outputs.logits.shape[1])
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
            kwargs = {k: v for k, v in inputs.items() if k in ("input_values", "input_features", "attention_mask")}
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
        """WER of the model being trained on the dev utterances, through the evaluation code path.

        Under a launcher every rank calls it: rank r decodes batches r, r + W, ... of the one-process
        batching, and the records are gathered, so each rank selects on the same WER. Each rank runs
        the same number of batches (an FSDP-sharded forward is a collective): a rank left without
        one decodes a batch again and drops its records."""
        from dataclasses import replace

        from ..evaluation import totals, utterance_records

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
            starts = range(0, len(ordered), size)
            mine = starts[rank() :: world_size()]
            for turn in range(math.ceil(len(starts) / world_size())):
                start = mine[turn] if turn < len(mine) else starts[0]
                batch = ordered[start : start + size]
                result = asr.transcribe(asr.prepare([row["audio"] for row in batch]))
                if turn < len(mine):
                    records.extend(utterance_records(asr, batch, result, "dev", 0.0))
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache
            model.train(was_training)
        records = [record for part in gather(records) for record in part]
        summary = totals(records)
        metrics = {f"{prefix}_wer": float(summary["wer"] or 0.0), f"{prefix}_utterances": summary["utterances"]}
        if summary["generation_limit_hits"] is not None:
            metrics[f"{prefix}_generation_limit_hits"] = summary["generation_limit_hits"]
        metrics[f"{prefix}_seconds"] = round(time.perf_counter() - started, 2)
        self.dev_history.append({"samples_seen": self.seen_by_all_ranks(), "wer": metrics[f"{prefix}_wer"]})
        return metrics


def _ctc_input_lengths(inputs: dict[str, torch.Tensor], sample_lengths: torch.Tensor) -> torch.Tensor:
    """What a CTC model's ``_get_feat_extract_output_lengths`` counts: audio samples (wav2vec2's raw
    ``input_values``), or feature frames for a model fed ``input_features`` (mla_convert's Conformer
    and Branchformer)."""
    features = inputs.get("input_features")
    if features is None:
        return sample_lengths
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.sum(-1)
    return torch.full((features.shape[0],), features.shape[1], device=features.device)


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
            overlap = split_overlap(train_ids, split, source)
        except DataError as error:
            raise FinetuneError(f"test data: {error}") from None
        if overlap:
            raise FinetuneError(
                f"the training data shares {len(overlap)} utterances with {split} (e.g. {overlap[0]}): "
                "a fine-tuned model is never evaluated on what it was trained on"
            )


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
    from ..evaluation import resolve_device
    from ..io import transformers_progress_bars

    check_config(config)
    if config.resume:
        check_resume_args(config)
    # data first: a missing folder or an unreachable Hub is reported before minutes of model loading,
    # and the test data before hours of training
    check_data(config)
    device = device_for_rank(resolve_device(config.device))  # under a launcher: cuda:LOCAL_RANK
    choose_precision(config.precision, device)
    init_process_group(device)  # Trainer's accelerate state joins the same group
    with transformers_progress_bars(config.progress):  # --quiet: no loading / shard-writing bars either
        return _finetune(config, device, callbacks)


def _finetune(config: FinetuneConfig, device: torch.device, callbacks: Sequence[Any]) -> dict[str, Any]:
    from ..evaluation import load_asr_model

    output = Path(config.output)
    labelled = not config.distill_only
    precision = choose_precision(config.precision, device)
    student = load_asr_model(config.model, device)
    teacher = load_asr_model(config.teacher, device) if config.teacher else None
    if teacher is not None:
        if student.kind == "nar":
            raise FinetuneError(
                "distillation of a Paraformer is not supported: its token rows follow its own predictor, "
                "so teacher and student logits do not line up; fine-tune it on transcripts"
            )
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
    steps = planned_steps(config, size)
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

    # every rank has read the run directory before rank 0 writes to it; rank 0's view of it decides
    barrier()
    found = last_complete_checkpoint(output / CHECKPOINTS) if config.resume else None
    checkpoint, finished = broadcast((found, config.resume and (output / TRAINED_FILE).is_file()))
    if finished:
        trained = json.loads((output / TRAINED_FILE).read_text(encoding="utf-8"))
        logger.warning("--resume: training had finished (%d steps); going on to the evaluation", trained["steps"])
    else:
        if config.resume and checkpoint is None:
            logger.warning("--resume: no complete checkpoint in %s; training starts from step 0", output / CHECKPOINTS)
        if checkpoint is not None:
            run.restore(checkpoint)
            logger.warning("resuming from %s", checkpoint)
        if is_main():
            output.mkdir(parents=True, exist_ok=True)
            (output / ARGS_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        barrier()
        trained, weights = _train(run, model, train_dataset, steps, precision, device, checkpoint, callbacks, counts)
        trained = {**trained, "device": describe_device(device), "precision": precision, **counts}
        trained["stopped_early"] = trained["steps"] < steps
        if is_main():  # checkpoints, the model and the results are rank 0's to write
            save_final_model(run, model, student.path, output, weights)
            (output / TRAINED_FILE).write_text(json.dumps(trained, indent=2))
        barrier()  # the final evaluation reads the saved model on every rank
    student.close()
    if teacher is not None:
        teacher.close()
    return evaluate_and_summarise(config, trained, size)


def _train(
    run, model, dataset, steps, precision, device, checkpoint, callbacks, counts
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Train with Trainer; ``(what was trained, the full weights)``. The weights are None unless
    FSDP split them across ranks: then every rank takes part in gathering them and rank 0 holds
    the whole state dict (the other ranks an empty one)."""
    from transformers import EarlyStoppingCallback, set_seed

    config = run.config
    set_seed(config.seed)
    selecting = bool(run.dev)
    args = training_arguments(config, precision, device, selecting, steps)
    extra = [progress_callback(run), *callbacks]  # progress first: other on_save hooks see a complete checkpoint
    board = tensorboard_callback(Path(config.output) / "runs") if is_main() else None
    if board is not None:
        extra.append(board)
    if selecting and config.early_stopping_patience > 0:
        extra.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=run.dev or None,
        data_collator=run.collator,
        callbacks=extra,
        finetune=run,
    )
    mode = {"fp32": "fp32", "fp16": "fp16 mixed precision", "bf16": "bf16 mixed precision"}[precision]
    processes = world_size()
    if is_main():
        logger.warning(
            "training %s in %s on %s: %d steps of %d x %d utterances, %s of %s parameters trainable (--freeze %s)%s",
            run.student.model_id, mode, describe_device(device), steps, config.batch_size * processes,
            config.grad_accum, f"{counts['trainable_parameters']:,}", f"{counts['total_parameters']:,}",
            config.freeze,
            f"; distilling from {config.teacher}" + (" (shared encoder output)" if run.shared_encoder else "")
            if run.distilling else "",
        )  # fmt: skip
    checkpoints = Path(config.output) / CHECKPOINTS
    started = time.perf_counter()
    run._started = started
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLossError as error:
        removed = drop_checkpoints_from(checkpoints, error.step)
        good = last_complete_checkpoint(checkpoints)
        kept = f"last good checkpoint: {good}" if good else "no checkpoint was saved before it"
        dropped = f" (removed {', '.join(removed)}, whose weights give that loss)" if removed else ""
        raise FinetuneError(
            f"{error} (learning rate {config.lr}): training stopped; {kept}{dropped}; try a lower --lr"
        ) from None
    if board is not None and board.tb_writer is not None:
        board.tb_writer.close()
    weights = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    state = trainer.state
    best = state.best_model_checkpoint
    resumed_from = int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else 0
    trained = {
        "steps": state.global_step,
        # Trainer's own train_loss covers only the steps of this process (after a resume: the resumed ones)
        "train_loss": mean_training_loss(state.log_history, state.global_step, resumed_from, result.training_loss),
        "planned_steps": steps,
        "epochs": round(float(state.epoch or 0.0), 4),
        "world_size": processes,
        "samples_seen": run.seen_by_all_ranks(),
        "skipped_over_window": int(sum_over_ranks(run.collator.skipped_long)),
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
    return trained, weights


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
