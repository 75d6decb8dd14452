"""Calibration audio and the activation statistics calibrated conversions are fitted to.

Calibration data is any transcribed speech: ``hub`` (LibriSpeech dev-clean streamed), a
LibriSpeech root (its dev-clean), or any folder with LibriSpeech ``*.trans.txt`` files below it (a
subset such as ``dev-clean`` itself) or a ``transcripts.tsv`` (``id<TAB>text``) beside its audio.
LibriSpeech's test splits (test-clean, test-other), on which models are scored, are refused.
Every fifth utterance is held out: the report's activation errors are measured on utterances the fit never saw.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import (
    EVALUATION_SPLITS,
    HELD_OUT_EVERY,
    DataError,
    evaluation_split_in,
    hold_out,
    is_librispeech_root,
    iter_decoded,
    shared_ids,
)
from .errors import MlaConvertError
from .hosts import AttentionSite, HostAdapter
from .hosts.base import SiteInputs


class CalibrationError(MlaConvertError):
    """Calibration data that cannot be used (missing folder, no transcripts, overlap with test sets)."""


class EvaluationSplitCalibrationError(CalibrationError):
    """A calibration source that is (or holds) a LibriSpeech test split, the data models are scored on."""


CALIBRATION_SPLIT = "dev-clean"  # what ``hub`` and a LibriSpeech root contribute


def _refuse_evaluation_split(source: str, path: Path) -> None:
    split = evaluation_split_in(path.resolve())
    if split is not None:
        raise EvaluationSplitCalibrationError(
            f"--calibration {source}: LibriSpeech {split} is an evaluation split; calibrate on dev-clean "
            "(hub, or a LibriSpeech root) or other speech"
        )


def check_calibration_sources(sources: Sequence[str]) -> None:
    """Cheap checks of calibration sources before any model is loaded: each folder exists, and none
    is a LibriSpeech test split (test-clean, test-other) or a folder of one. A one-line
    :class:`CalibrationError` otherwise. (Utterances found below a root are checked again as read.)"""
    for source in sources:
        if source == "hub":
            continue
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise CalibrationError(f"calibration folder not found: {source}")
        _refuse_evaluation_split(source, folder)
        if is_librispeech_root(folder) and not is_librispeech_root(folder, CALIBRATION_SPLIT):
            # a root is read by subset: without dev-clean, say which test split it offers instead
            for split in EVALUATION_SPLITS:
                if is_librispeech_root(folder, split):
                    _refuse_evaluation_split(source, folder / split)


def _source_rows(source: str, sampling_rate: int) -> Iterable[dict]:
    """Decoded utterances of one source (a root's dev-clean), each checked not to be test data."""
    try:
        for row in iter_decoded(source, CALIBRATION_SPLIT, sampling_rate):
            if source != "hub":
                _refuse_evaluation_split(source, Path(row["path"]))
            yield row
    except DataError as error:
        raise CalibrationError(f"calibration data {source}: {error}") from None


def calibration_utterances(
    sources: Sequence[str], samples: int | None = None, sampling_rate: int = 16000
) -> list[dict]:
    """Up to ``samples`` utterances, taken round-robin from the sources so each contributes; a
    LibriSpeech test split (test-clean, test-other) is refused as a source."""
    check_calibration_sources(sources)
    streams = [iter(_source_rows(source, sampling_rate)) for source in sources]
    rows: list[dict] = []
    for row in itertools.chain.from_iterable(itertools.zip_longest(*streams)):
        if row is None:
            continue
        rows.append(row)
        if samples is not None and len(rows) >= samples:
            break
    if not rows:
        raise CalibrationError(f"no calibration utterances found in {', '.join(sources)}")
    return rows


def check_disjoint(rows: Sequence[dict], evaluation_ids: Iterable[str]) -> None:
    """Refuse calibration data that shares utterance ids with the data a model is evaluated on."""
    overlap = shared_ids((row["id"] for row in rows), evaluation_ids)
    if overlap:
        raise CalibrationError(
            f"calibration shares {len(overlap)} utterances with the evaluation data, e.g. {overlap[0]}"
        )


def split_held_out(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """``(fit, held_out)``: every fifth utterance is held out (all are fitted on if fewer than 5)."""
    if len(rows) < HELD_OUT_EVERY:
        return list(rows), list(rows)
    return hold_out(rows)


@dataclass
class Moments:
    """Running first and (uncentred) second moments of vectors, in float64."""

    sum_outer: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    count: int = 0

    def add(self, vectors: torch.Tensor) -> None:
        flat = vectors.reshape(-1, vectors.shape[-1]).to(torch.float64)
        if self.sum_outer is None:
            self.sum_outer = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
            self.sum = torch.zeros(flat.shape[1], dtype=torch.float64)
        self.sum_outer += (flat.T @ flat).cpu()
        self.sum += flat.sum(dim=0).cpu()
        self.count += flat.shape[0]

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x xᵀ]``: what ``‖(W − W')x‖²`` averages over."""
        return self.sum_outer / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


@dataclass
class SiteStatistics:
    """Moments of one attention site's query-side and key/value-side inputs."""

    query: Moments = field(default_factory=Moments)
    key_value: Moments = field(default_factory=Moments)


@torch.no_grad()
def observe_sites(
    model: nn.Module,
    adapter: HostAdapter,
    sites: Sequence[AttentionSite],
    batches: Iterable[dict],
    record: Callable[[AttentionSite, SiteInputs], None],
) -> None:
    """Run the model (in eval mode) on ``batches``; ``record`` sees every call of every site."""
    hooks = []
    for site in sites:

        def hook(module, args, kwargs, site=site):
            record(site, adapter.site_inputs(site, args, kwargs))

        hooks.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)


def collect_statistics(
    model: nn.Module, adapter: HostAdapter, sites: Sequence[AttentionSite], batches: Iterable[dict]
) -> dict[str, SiteStatistics]:
    """Run the *original* model on ``batches`` and accumulate each site's input moments.

    The batches are materialised first: building them may itself run the model (a decoder's greedy
    transcript), and those calls must not count.
    """
    batches = list(batches)
    statistics = {site.path: SiteStatistics() for site in sites}

    def record(site: AttentionSite, inputs: SiteInputs) -> None:
        statistics[site.path].query.add(inputs.query)
        statistics[site.path].key_value.add(inputs.key_value)

    observe_sites(model, adapter, sites, batches, record)
    return statistics
