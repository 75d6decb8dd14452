"""Training and dev data of a fine-tuning run: local row indexing, the dataset, the dev split, the collator."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import (
    AudioDecodeError,
    DataError,
    audio_seconds,
    decode_audio,
    decoded,
    hold_out,
    index_sources,
    is_librispeech_root,
    librispeech,
)
from ..distributed import is_distributed, rank, world_size
from .config import FinetuneConfig, FinetuneError

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- data


def index_rows(sources: Sequence[str], split: str, *, transcribed: bool = True) -> list[dict]:
    """Index rows (audio undecoded) of local sources (:func:`mla_convert.data.index_sources`): a
    LibriSpeech root (its ``split``), or any folder of transcribed audio; one-line errors."""
    try:
        return index_sources(sources, split, transcribed=transcribed)
    except DataError as error:
        raise FinetuneError(f"training data: {error}") from None


class AudioRows(torch.utils.data.Dataset):
    """Map-style dataset over index rows; audio is decoded on access by the data module's decoder."""

    def __init__(self, rows: Sequence[dict], sampling_rate: int) -> None:
        self.rows = list(rows)
        self.sampling_rate = sampling_rate

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        try:
            audio = decode_audio(row["audio"], self.sampling_rate)
        except AudioDecodeError as error:  # found mid-run: one line naming the file, not a traceback
            name = (row["audio"] or {}).get("path") if isinstance(row["audio"], dict) else row["audio"]
            raise FinetuneError(
                f"training data: cannot decode {name or row['id']} ({error}); remove or replace the file, "
                "then continue with --resume"
            ) from None
        return {"id": row["id"], "text": row["text"], "audio": audio}


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
        rows = [row for row in rows if audio_seconds(row["audio"]) <= config.max_seconds]
        if not rows:
            raise FinetuneError(f"no training utterance is at most --max-seconds {config.max_seconds} long")
    if config.max_samples:
        rows = rows[: config.max_samples]
    return AudioRows(rows, sampling_rate), len(rows)


def rank_stream(dataset):
    """This rank's part of a streamed dataset under a launcher (the stream itself without one):
    :func:`datasets.distributed.split_dataset_by_node` gives each rank whole shards when their
    count divides by the world size, else every W-th example, so no utterance is read twice."""
    if not is_distributed():
        return dataset
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank(), world_size=world_size())


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
        roots = [s for s in config.data if s == "hub" or is_librispeech_root(s, config.eval_split)]
        if config.eval_split != config.train_split and roots:
            choice = roots[0]
    if choice is None:
        if not train_rows:
            return [], train_rows
        held = hold_out(train_rows)[1]
        held = held[:limit] if limit else held
        held_ids = {row["id"] for row in held}
        rest = [row for row in train_rows if row["id"] not in held_ids]
        logger.info("model selection on %d utterances held out of the training data", len(held))
        return decoded(held, sampling_rate), rest
    if choice == "hub":
        rows = list(librispeech(config.eval_split, "hub", sampling_rate, limit=limit))
    else:
        rows = decoded(index_rows([choice], config.eval_split)[:limit], sampling_rate)
    held_ids = {row["id"] for row in rows}
    if train_rows is not None:
        overlap = [row for row in train_rows if row["id"] in held_ids]
        if overlap:
            logger.warning("%d dev utterances removed from the training data", len(overlap))
            train_rows = [row for row in train_rows if row["id"] not in held_ids]
    return rows, train_rows


# kinds whose batches are padded features + a frame mask and whose labels are the transcript's
# token ids padded with -100 (no decoder prompt): CTC models and non-autoregressive ones (Paraformer)
FRAME_LABEL_KINDS = ("ctc", "nar")


def label_text(text: str, tokenizer: Any, kind: str) -> str:
    """A transcript in the writing style the model's vocabulary expects.

    LibriSpeech writes upper case without punctuation. A CTC vocabulary of single letters is
    either upper or lower case: match it. Whisper-style seq2seq models write cased text: an
    all-caps transcript becomes sentence case, so training does not teach the model to shout
    (the evaluation normaliser lower-cases anyway).
    """
    if kind in FRAME_LABEL_KINDS:
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
        if self.kind in FRAME_LABEL_KINDS:
            batch = self._ctc(audios)
        else:
            batch = dict(self.feature_extractor(audios, sampling_rate=self.sampling_rate, return_tensors="pt"))
            batch.pop("attention_mask", None)
        batch["sample_lengths"] = torch.tensor([len(a) for a in audios])
        if self.labelled:
            texts = [label_text(row["text"], self.tokenizer, self.kind) for row in rows]
            batch.update(self.ctc_labels(texts) if self.kind in FRAME_LABEL_KINDS else self.seq2seq_labels(texts))
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
