"""Fine-tune a (converted) speech model with ``transformers.Trainer``, optionally distilling from the original.

A conversion below the lossless rank costs accuracy; a short fine-tune wins it back. This package
is model-agnostic: anything :func:`mla_convert.evaluation.load_asr_model` loads (a CTC model or a
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

Modules: :mod:`.config` (settings and their checks), :mod:`.batches` (data and collator),
:mod:`.trainer` (losses, freezing, the ``Trainer`` subclass), :mod:`.run` (one run end to end),
:mod:`.checkpoints` (checkpoints and the final model), :mod:`.summary` (evaluation and summary),
:mod:`.recipe` and :mod:`.train` (``mla-convert train``: a Conformer / Branchformer trained from
scratch by a YAML recipe, through :func:`finetune`; ``train.train`` is not re-exported here, so
the name ``finetuning.train`` stays the module).
"""

from __future__ import annotations

from .batches import SpeechCollator, label_text
from .checkpoints import last_complete_checkpoint
from .config import FREEZE_CHOICES, FinetuneConfig, FinetuneError, check_config, parse_test_splits
from .recipe import Recipe, RecipeError, load_recipe
from .run import FinetuneRun, check_data, finetune, mean_training_loss
from .summary import format_summary
from .trainer import NonFiniteLossError, distillation_loss

__all__ = [
    "FREEZE_CHOICES",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneRun",
    "NonFiniteLossError",
    "Recipe",
    "RecipeError",
    "SpeechCollator",
    "check_config",
    "check_data",
    "distillation_loss",
    "finetune",
    "format_summary",
    "label_text",
    "last_complete_checkpoint",
    "load_recipe",
    "mean_training_loss",
    "parse_test_splits",
]
