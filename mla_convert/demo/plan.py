"""A demo request checked and costed before anything runs: data, splits, calibration audio, time and disk estimate."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data import is_librispeech_root, local_split_dir
from ..errors import MlaConvertError
from ..importers.bundled import BUNDLED_WHISPER
from ..loading import load_config, resolve_model_id
from ..specs import GQASpec, MLASpec
from .variants import (
    DEFAULT_KV_HEADS,
    DEFAULT_LATENT_DIMS,
    DEFAULT_SPLITS,
    ORIGINAL,
    PLAIN,
    QUICK_LATENT_DIMS,
    QUICK_LIMIT,
    QUICK_SPLITS,
    DemoError,
    Variant,
    demo_variants,
)

logger = logging.getLogger(__name__)

# rough costs on an idle 2-core CPU (Whisper tiny.en; results/*.md and demo runs), for the estimate
# printed before a run: other jobs on the machine make everything slower
_SECONDS_PER_UTTERANCE = 0.5  # one model, one utterance: load share + greedy decoding
_SECONDS_PER_CALIBRATION_UTTERANCE = 2.0  # greedy transcript (generate) + teacher-forced statistics
_CONVERT_SECONDS = {"plain": 6.0, "calibrated": 10.0, "budget": 60.0}


@dataclass
class DemoPlan:
    """What ``mla-convert demo`` will do, checked before anything is converted."""

    variants: list[Variant]
    base: str
    base_dir: str
    data: str
    splits: list[str]
    limit: int | None
    batch_size: int
    output_dir: Path
    checkpoints_dir: Path
    utterances: dict[str, int | None]
    calibration: tuple[str, ...]
    calibration_samples: int | None
    calibration_utterances: int | None
    quick: bool = False
    checkpoint_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def conversions(self) -> list[Variant]:
        return [v for v in self.variants if v.spec is not None]

    @property
    def evaluations(self) -> int:
        return len(self.variants) * len(self.splits)

    @property
    def evaluated_utterances(self) -> int | None:
        counts = list(self.utterances.values())
        return None if any(c is None for c in counts) else sum(counts)

    def estimated_seconds(self) -> float:
        """A rough wall time on a 2-core CPU (conversions, the calibration pass, evaluation)."""
        seconds = 0.0
        for variant in self.conversions:
            if not variant.calibration:
                seconds += _CONVERT_SECONDS["plain"]
            elif isinstance(variant.spec, MLASpec) and variant.spec.cache_budget is not None:
                seconds += _CONVERT_SECONDS["budget"]
            else:
                seconds += _CONVERT_SECONDS["calibrated"]
        if any(v.calibration for v in self.variants):
            seconds += _SECONDS_PER_CALIBRATION_UTTERANCE * (self.calibration_utterances or 64)
        utterances = self.evaluated_utterances
        if utterances is None:  # the Hub: the corpus sizes are known for LibriSpeech, else a guess
            utterances = 200 * len(self.splits)
        seconds += _SECONDS_PER_UTTERANCE * utterances * len(self.variants)
        return seconds

    def describe(self) -> str:
        """The plan, printed before the run starts."""
        calibrated = [v for v in self.variants if v.calibration]
        per_split = ", ".join(f"{split} {'?' if n is None else n}" for split, n in self.utterances.items())
        lines = [
            f"mla-convert demo{' --quick' if self.quick else ''}: {self.base} on {self.data} ({per_split} utterances)",
            f"  {len(self.variants)} rows: {', '.join(v.name for v in self.variants)}",
            f"  {len(self.conversions)} conversions ({len(calibrated)} calibrated, sharing one calibration pass"
            + (
                f" over {self.calibration_utterances} utterances of {', '.join(self.calibration)})"
                if calibrated
                else ")"
            ),
            f"  {self.evaluations} evaluations ({len(self.variants)} models x {len(self.splits)} splits)",
            f"  expected ~{self.estimated_seconds() / 60:.0f} min on an idle 2-core CPU (less on a GPU); "
            f"~{self.checkpoint_bytes / 1e6:.0f} MB written under {self.checkpoints_dir}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _check_writable_dir(path: Path, option: str) -> Path:
    """``path`` is a directory or can become one: no file in the way, at it or above it."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == path else f" ({candidate} is a file)"
                raise DemoError(f"{option} {path} is not a directory{where}")
            break
    return path


def _count_split(source, split: str) -> int | None:
    from ..data import DataError, count_utterances, local_split_dir

    if str(source) == "hub":
        return count_utterances(split, source)
    try:
        folder = local_split_dir(source, split)
    except DataError as error:
        raise DemoError(f"--split {split}: {error}") from None
    count = count_utterances(split, source)
    if not count:
        raise DemoError(f"--split {split}: no utterances in {folder} (no <spk>-<chapter>.trans.txt files)")
    return count


def calibration_sources(source, splits: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    """``(sources, notes)``: the calibration audio the committed tables used, for an evaluation source.

    A local root: its ``dev-clean`` plus ``other/ljspeech`` beside the root when present; the Hub:
    ``hub`` (LibriSpeech dev-clean). A source that is also an evaluation split is left out.
    """
    notes = []
    if str(source) == "hub":
        if "dev-clean" in splits:
            raise DemoError(
                "--split dev-clean with --data hub: the calibrated rows calibrate on the Hub's dev-clean; "
                "evaluate on other splits (test-clean, test-other)"
            )
        return ("hub",), notes
    root = Path(source)
    found = []
    dev_clean = local_split_dir(root, "dev-clean") if is_librispeech_root(root, "dev-clean") else None
    if dev_clean is not None:
        if "dev-clean" in splits:
            notes.append("dev-clean is evaluated, so it is not used for calibration")
        else:
            found.append(str(dev_clean))
    ljspeech = root.parent / "other" / "ljspeech"
    if ljspeech.is_dir():
        found.append(str(ljspeech))
    if not found:
        raise DemoError(
            f"the calibrated rows need calibration audio: no dev-clean under {root} (and no {ljspeech}); "
            "give a LibriSpeech root with dev-clean, or plain rows only with --plain-only"
        )
    return tuple(found), notes


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def plan_demo(
    *,
    data: str | None = None,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
    latent_dims: Sequence[int] | None = None,
    batch_size: int = 16,
    output_dir: str | Path = "results",
    checkpoints_dir: str | Path = "checkpoints/demo",
    quick: bool = False,
    plain_only: bool = False,
    kv_heads: int | None = DEFAULT_KV_HEADS,
    calibration_samples: int | None = None,
    base: str = BUNDLED_WHISPER,
) -> DemoPlan:
    """Check every demo argument (cheap ones first) and return what the run will do.

    ``quick``: test-clean only, the first ``QUICK_LIMIT`` utterances and the d_c 96 rows, unless
    ``splits`` / ``limit`` / ``latent_dims`` are given. Nothing is converted or written here.
    """
    from ..data import check_split, resolve_source

    if limit is not None and limit < 1:
        raise DemoError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise DemoError(f"--batch-size must be at least 1 (got {batch_size})")
    if calibration_samples is not None and calibration_samples < 1:
        raise DemoError(f"--calibration-samples must be at least 1 (got {calibration_samples})")
    if kv_heads is not None and kv_heads < 1:
        raise DemoError(f"--kv-heads must be at least 1 (got {kv_heads})")
    splits = list(dict.fromkeys(splits or (QUICK_SPLITS if quick else DEFAULT_SPLITS)))
    for split in splits:
        check_split(split)
    if quick and limit is None:
        limit = QUICK_LIMIT
    latent_dims = list(dict.fromkeys(latent_dims or (QUICK_LATENT_DIMS if quick else DEFAULT_LATENT_DIMS)))
    output_dir = _check_writable_dir(Path(output_dir), "--output-dir")
    checkpoints_dir = _check_writable_dir(Path(checkpoints_dir), "--checkpoints-dir")
    if checkpoints_dir.resolve() == output_dir.resolve():
        raise DemoError(f"--checkpoints-dir and --output-dir are both {output_dir}: give them different folders")
    source = resolve_source(data)  # one-line DataError: missing path, Hub offline
    utterances = {}
    for split in splits:
        count = _count_split(source, split)
        utterances[split] = count if limit is None or count is None else min(count, limit)

    base_dir = resolve_model_id(base)
    config = load_config(base_dir)
    hidden, heads = config.d_model, config.decoder_attention_heads
    for d in latent_dims:
        MLASpec(latent_dim=d).validate(hidden, heads)  # one-line SpecError naming the valid range
    if kv_heads is not None:
        GQASpec(kv_heads=kv_heads).validate(hidden, heads)
    notes: list[str] = []
    if plain_only:
        sources: tuple[str, ...] = ()
        variants = [Variant("original", series=ORIGINAL)] + [
            Variant(f"mla-{d}", MLASpec(latent_dim=d), series=PLAIN) for d in sorted(latent_dims, reverse=True)
        ]
    else:
        sources, notes = calibration_sources(source, splits)
        variants = demo_variants(latent_dims, hidden, sources, kv_heads)
    calibration_count = _count_calibration(sources, calibration_samples) if sources else None
    size = _directory_bytes(Path(base_dir))
    plan = DemoPlan(
        variants=variants,
        base=base,
        base_dir=str(base_dir),
        data="hub" if str(source) == "hub" else str(source),
        splits=splits,
        limit=limit,
        batch_size=batch_size,
        output_dir=output_dir,
        checkpoints_dir=checkpoints_dir,
        utterances=utterances,
        calibration=sources,
        calibration_samples=calibration_samples,
        calibration_utterances=calibration_count,
        quick=quick,
        notes=notes,
    )
    plan.checkpoint_bytes = size * len(plan.conversions)
    return plan


def _count_calibration(sources: Sequence[str], samples: int | None) -> int | None:
    """How many calibration utterances the sources hold (transcript lines; the Hub: unknown)."""
    from ..data import iter_folder_index

    if "hub" in sources:
        return samples
    total = 0
    for source in sources:
        try:
            total += sum(1 for _ in iter_folder_index(source))
        except MlaConvertError as error:
            raise DemoError(f"calibration audio {source}: {error}") from None
    return min(total, samples) if samples is not None else total
