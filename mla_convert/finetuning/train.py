"""``mla-convert train``: a Conformer / Branchformer CTC model or a Paraformer trained from scratch by a YAML recipe.

A run is (1) the recipe, read and checked (:mod:`.recipe`); (2) the character vocabulary of the
training transcripts and the global CMVN statistics of their log-mel features (ESPnet's
``collect_stats``), over exactly the utterances the run trains on (the dev hold-out left out);
(3) the untrained model, initialised from the recipe's seed, saved with its processor to
``<output>/initial``; (4) :func:`~mla_convert.finetuning.finetune` of that model into ``<output>``
with every parameter trainable: the same data, dev selection, checkpoints, resume, precision and
final evaluation as any fine-tuning run. ``--resume`` reuses ``<output>/initial`` (its vocabulary
and CMVN statistics) and continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..data import ENV_ROOT, decode_audio, is_librispeech_root
from ..distributed import barrier, broadcast, device_for_rank, init_process_group, is_main
from ..frontend import build_processor, char_vocabulary, cmvn_statistics
from ..io import atomic_file, atomic_output_dir, transformers_progress_bars
from ..modeling.feature_extraction_conformer import ConformerFeatureExtractor
from .batches import AudioRows, dev_rows, training_data
from .config import ARGS_FILE, SUMMARY_FILE, FinetuneConfig, check_config
from .recipe import Recipe, RecipeError, load_recipe, tokenizer_class_of
from .run import check_data, finetune

logger = logging.getLogger(__name__)

INITIAL = "initial"
RECIPE_JSON = "train_recipe.json"
RECIPE_YAML = "recipe.yaml"
# CMVN statistics from a Hub stream (it has no end): its first utterances, unless the recipe says
HUB_CMVN_UTTERANCES = 500


def default_output(recipe_path: str | Path) -> Path:
    """``runs/<recipe file name without .yaml>``."""
    return Path("runs") / Path(recipe_path).stem


def build_initial(recipe: Recipe, texts: Iterable[str], audios: Iterable[np.ndarray]):
    """``(untrained model, processor)``: the characters of ``texts`` (the LibriSpeech letters
    always included) and the global mean / std of the log-mel features of ``audios``."""
    tokens = char_vocabulary(texts)
    mean, std = cmvn_statistics(audios, ConformerFeatureExtractor(**recipe.frontend))
    processor = build_processor(tokens, mean, std, tokenizer_class=tokenizer_class_of(recipe.family), **recipe.frontend)
    return recipe.build_model(len(tokens)), processor


def training_utterances(config: FinetuneConfig, sampling_rate: int, limit: int | None) -> tuple[list[str], Iterator]:
    """``(transcripts, audio iterator)`` of the utterances the run trains on: a local source's rows
    without the dev hold-out (as :func:`finetune` splits them), decoded one at a time; a Hub
    stream's first ``limit`` utterances (default :data:`HUB_CMVN_UTTERANCES`)."""
    dataset, _ = training_data(config, sampling_rate, labelled=True)
    if isinstance(dataset, AudioRows):
        _, rows = dev_rows(config, dataset.rows, sampling_rate)
        rows = rows[:limit] if limit else rows
        if not rows:
            raise RecipeError("no training utterances left after holding out the dev set")
        return [row["text"] for row in rows], (decode_audio(row["audio"], sampling_rate) for row in rows)
    rows = list(islice(dataset, limit or HUB_CMVN_UTTERANCES))
    return [row["text"] for row in rows], (np.asarray(row["audio"], dtype=np.float32) for row in rows)


def _check_same_start(recipe: Recipe, initial: Path) -> None:
    """``--resume`` with a recipe that would build another start model is refused."""
    stored_path = initial / RECIPE_JSON
    if not stored_path.is_file():
        raise RecipeError(f"--resume: {stored_path} is missing; {initial.parent} is not a training run directory")
    stored = json.loads(stored_path.read_text(encoding="utf-8"))["resolved"]
    current = json.loads(json.dumps(recipe.resolved()))  # the JSON view: tuples as lists
    for section, value in current.items():
        if isinstance(value, dict):
            for key in sorted(set(value) | set(stored.get(section, {}))):
                if value.get(key) != stored.get(section, {}).get(key):
                    before, now = stored.get(section, {}).get(key), value.get(key)
                    raise RecipeError(
                        f"--resume: {section}.{key} was {before!r} when {initial} was built, now {now!r}: "
                        "resume with the original recipe, or start a new run with another --output"
                    )
        elif value != stored.get(section):
            raise RecipeError(
                f"--resume: {section} was {stored.get(section)!r} when {initial} was built, now {value!r}: "
                "resume with the original recipe, or start a new run with another --output"
            )


def write_initial(recipe: Recipe, config: FinetuneConfig, initial: Path, progress: bool = True) -> dict[str, Any]:
    """Compute the vocabulary and CMVN statistics, build the model and save both to ``initial``
    (staged, then renamed). Returns what was built."""
    texts, audios = training_utterances(config, recipe.sampling_rate, recipe.cmvn_utterances)
    logger.warning("CMVN statistics and the character vocabulary over %d training utterances", len(texts))
    model, processor = build_initial(recipe, texts, audios)
    parameters = sum(p.numel() for p in model.parameters())
    info = {
        "recipe": str(recipe.path),
        "family": recipe.family,
        "size": recipe.size,
        "attention": model.config.attention,
        "parameters": parameters,
        "vocab_size": model.config.vocab_size,
        "cmvn_utterances": len(texts),
        "seed": recipe.seed,
    }
    with transformers_progress_bars(progress), atomic_output_dir(initial) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / RECIPE_YAML).write_text(recipe.text, encoding="utf-8")
        stored = {"info": info, "resolved": recipe.resolved()}
        (staging / RECIPE_JSON).write_text(json.dumps(stored, indent=2), encoding="utf-8")
    logger.warning(
        "built a %s %s (%s attention, %s parameters, %d tokens) in %s",
        recipe.size, recipe.family, model.config.attention["type"], f"{parameters:,}", info["vocab_size"], initial,
    )  # fmt: skip
    return info


def _data_default(data: Sequence[str] | None, recipe: Recipe) -> list[str]:
    if data:
        return [str(source) for source in data]
    return list(recipe.training.get("data") or [os.environ.get(ENV_ROOT) or "hub"])


def train(
    recipe_path: str | Path,
    output: str | Path | None = None,
    data: Sequence[str] | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the recipe's model from scratch into ``output`` (default ``runs/<recipe stem>``).

    ``data`` and ``max_steps`` override the training section (the command line's ``--data`` /
    ``--max-steps``); ``overrides`` (``model={...}``, ``frontend={...}``, ``training={...}``,
    ``seed=N``) update the recipe's sections before it is checked. Returns the fine-tuning summary
    (also in ``<output>/finetune_summary.json``) with the recipe's ``train`` entry.
    """
    recipe = load_recipe(recipe_path, overrides)
    output = Path(output) if output is not None else default_output(recipe_path)
    initial = output / INITIAL
    sources = _data_default(data, recipe)
    settings: dict[str, Any] = {"data": sources, "max_steps": max_steps, "progress": progress}
    if "test_data" not in recipe.training and len(sources) == 1 and is_librispeech_root(sources[0]):
        settings["test_data"] = sources[0]  # the final evaluation reads the training root's test splits
    config = recipe.finetune_config(output, initial, resume=resume, **settings)
    # refused before any audio is read: the output, the settings, the data and the test data
    if resume and not output.is_dir():
        raise RecipeError(f"--resume: {output} does not exist; start the run without --resume")
    if not resume and output.exists():
        raise RecipeError(f"{output} already exists; pass --resume to continue that run, or choose another --output")
    check_config(config)
    check_data(config)
    # under a launcher: every rank has checked the output folder before rank 0 creates it, and
    # rank 0 alone builds the start model (its CMVN pass reads every training utterance)
    from ..evaluation import resolve_device

    init_process_group(device_for_rank(resolve_device(config.device)))
    barrier()
    if broadcast(resume and initial.is_dir()):
        _check_same_start(recipe, initial)
        info = json.loads((initial / RECIPE_JSON).read_text(encoding="utf-8"))["info"]
        if is_main():
            logger.warning("--resume: reusing %s (its vocabulary and CMVN statistics)", initial)
    else:
        info = broadcast(write_initial(recipe, config, initial, progress) if is_main() else None)
    # a run killed before training started has no finetune_args.json yet: it starts afresh
    config.resume = broadcast(resume and (output / ARGS_FILE).is_file())
    summary = finetune(config)
    summary["train"] = info
    if is_main():
        with atomic_file(output / SUMMARY_FILE) as temporary:
            temporary.write_text(json.dumps(summary, indent=2))
    return summary
