"""The README's main job: convert the bundled Whisper tiny.en and measure what each conversion costs.

The default demo puts plain and calibrated conversions of the decoder self-attention (the part
whose cache grows with every generated token) side by side at the same cache sizes: plain SVD MLA
(d_c 384 is lossless, the exactness row), calibrated MLA with a uniform latent, calibrated MLA under
the matching measured cache budget, and calibrated GQA. Every calibrated row is fitted on the same
calibration pass (utterances decoded once, checked by id to share nothing with the evaluation
splits). Each variant is converted from the imported original, saved under ``checkpoints/``, and
all of them are evaluated in one ``evaluate_models`` run (resumable). The table gives WER, the error
split into substitutions / deletions / insertions, how many utterances hit the generation limit (a
looping decoder), and the decoder K/V-cache bytes per generated token; a plot shows WER against
cache size, one line per series (plain, calibrated, budget) and split.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import convert_checkpoint
from .ct2 import BUNDLED_WHISPER
from .errors import MlaConvertError
from .evaluate import evaluate_models
from .io import atomic_file
from .loading import load_config, resolve_model_id
from .specs import AttentionSpec, GQASpec, LinearSpec, MLASpec, spec_to_dict

logger = logging.getLogger(__name__)


def _quiet_advice(message: str) -> None:
    """The demo's plain rows are deliberate: convert_checkpoint's "use calibration" advice is not shown."""
    logger.debug("%s", message)


# convert_checkpoint's ``warn`` (advice for uncalibrated specs) where this version has it
_CONVERT_OPTIONS = {"warn": _quiet_advice} if "warn" in inspect.signature(convert_checkpoint).parameters else {}

DEFAULT_LATENT_DIMS = (384, 192, 96, 48)
QUICK_LATENT_DIMS = (96,)
DEFAULT_SPLITS = ("test-clean", "test-other")
QUICK_SPLITS = ("test-clean",)
QUICK_LIMIT = 20
DEFAULT_KV_HEADS = 3
DEMO_NAME = "demo"
DEMO_TITLE = "mla-convert demo: Whisper tiny.en, WER vs. decoder K/V cache per token, plain SVD vs. calibrated"

# plot / table series
ORIGINAL = "original"
PLAIN = "MLA plain SVD"
CALIBRATED = "MLA calibrated (uniform d_c)"
BUDGET = "MLA calibrated (measured budget)"
GQA_CALIBRATED = "GQA calibrated"

# rough costs on an idle 2-core CPU (Whisper tiny.en; results/*.md and demo runs), for the estimate
# printed before a run: other jobs on the machine make everything slower
_SECONDS_PER_UTTERANCE = 0.5  # one model, one utterance: load share + greedy decoding
_SECONDS_PER_CALIBRATION_UTTERANCE = 2.0  # greedy transcript (generate) + teacher-forced statistics
_CONVERT_SECONDS = {"plain": 6.0, "calibrated": 10.0, "budget": 60.0}

DEMO_NOTES = """The bundled Whisper tiny.en, decoder self-attention converted, no fine-tuning, greedy decoding,
Whisper's English normaliser. Plain rows: MLA seeded by a truncated SVD of [W_k; W_v] (d_c 384 is
lossless: the exactness row). Calibrated rows (the toolkit's defaults with `--calibration`): MLA by a
whitened joint SVD with the attention objective (keys weighed by the queries that read them, values by
the output projection), either one latent size for every layer ("-cal") or the same total cache under
`--cache-budget` with per-layer sizes chosen by the measured output divergence on held-out calibration
audio ("budget"); GQA with heads grouped by activation similarity and merged by weighted least squares.
"S/D/I" are substitutions / deletions / insertions; "at limit" counts utterances whose generation hit
the token limit (a looping decoder). Cache: decoder self-attention K/V state per generated token, all
layers, fp32. "convert s": wall time of that row's conversion in this run (the first calibrated row
includes the shared calibration pass).

"""


class DemoError(MlaConvertError):
    """A demo request that cannot run (bad --limit, missing split, --output-dir naming a file...)."""


@dataclass(frozen=True)
class Variant:
    """One row of the table: a name and the conversion that makes it (``None``: the original).

    ``series`` groups rows into one line of the plot (default: the attention kind, plain or calibrated).
    """

    name: str
    spec: AttentionSpec | None = None
    targets: tuple[str, ...] = ("decoder",)
    calibration: tuple[str, ...] = ()
    calibration_text: bool = False
    series: str = ""

    @property
    def description(self) -> str:
        if self.spec is None:
            return "original (MHA)"
        details = ", ".join(f"{k}={v}" for k, v in spec_to_dict(self.spec).items() if k != "attention")
        if self.calibration:
            details += ", calibrated on " + ("transcripts" if self.calibration_text else "own greedy output")
        return f"{self.spec.attention.upper()} ({details}) on {'+'.join(self.targets)}"

    @property
    def group(self) -> str:
        if self.series:
            return self.series
        if self.spec is None:
            return ORIGINAL
        return f"{self.spec.attention.upper()} {'calibrated' if self.calibration else 'plain'}"


def mla_variants(latent_dims: Sequence[int] = DEFAULT_LATENT_DIMS) -> list[Variant]:
    """The original and plain-SVD MLA at each latent size (no calibration)."""
    return [Variant("original")] + [Variant(f"mla-{d}", MLASpec(latent_dim=d), series=PLAIN) for d in latent_dims]


def table_variants(
    latent_dims: Sequence[int] = DEFAULT_LATENT_DIMS, kv_heads: Sequence[int] = (3, 2, 1)
) -> list[Variant]:
    """The Whisper issue's full table: MLA sizes, GQA sizes and linear attention."""
    gqa = [Variant(f"gqa-{g}", GQASpec(kv_heads=g)) for g in kv_heads]
    return mla_variants(latent_dims) + gqa + [Variant("linear-elu", LinearSpec())]


def budget_fraction(latent_dim: int, hidden_size: int) -> float:
    """The cache budget (fraction of the MHA K/V values per token) a uniform ``latent_dim`` spends."""
    return latent_dim / (2 * hidden_size)


def demo_variants(
    latent_dims: Sequence[int],
    hidden_size: int,
    calibration: Sequence[str],
    kv_heads: int | None = DEFAULT_KV_HEADS,
) -> list[Variant]:
    """The default demo rows, grouped by cache size.

    For each latent size (largest first): plain SVD MLA; below the lossless size (``hidden_size``)
    also calibrated MLA with that uniform latent and calibrated MLA under the same cache budget
    (``d_c / (2 * hidden_size)``, per-layer sizes measured). Then calibrated GQA with ``kv_heads``.
    """
    sources = tuple(calibration)
    variants = [Variant("original", series=ORIGINAL)]
    for d in sorted(dict.fromkeys(latent_dims), reverse=True):
        variants.append(Variant(f"mla-{d}", MLASpec(latent_dim=d), series=PLAIN))
        if d >= hidden_size:
            continue  # lossless: calibration cannot improve on it
        variants.append(
            Variant(f"mla-{d}-cal", MLASpec(latent_dim=d, init="calibrated"), calibration=sources, series=CALIBRATED)
        )
        budget = budget_fraction(d, hidden_size)
        variants.append(
            Variant(
                f"mla-budget-{100 * budget:.3g}-cal",
                MLASpec(cache_budget=budget, init="calibrated"),
                calibration=sources,
                series=BUDGET,
            )
        )
    if kv_heads:
        variants.append(
            Variant(
                f"gqa-{kv_heads}-cal",
                GQASpec(kv_heads=kv_heads, init="calibrated"),
                calibration=sources,
                series=GQA_CALIBRATED,
            )
        )
    return variants


# ----------------------------------------------------------------------------------------- planning


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
    from .data import DataError, count_utterances, local_split_dir

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
    dev_clean = next((p for p in (root / "dev-clean", root / "LibriSpeech" / "dev-clean") if p.is_dir()), None)
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
    from .data import check_split, resolve_source

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
    from .data import iter_folder_index

    if "hub" in sources:
        return samples
    total = 0
    for source in sources:
        try:
            total += sum(1 for _ in iter_folder_index(source))
        except MlaConvertError as error:
            raise DemoError(f"calibration audio {source}: {error}") from None
    return min(total, samples) if samples is not None else total


# ------------------------------------------------------------------------------------------ running


def _decoder_cache_bytes(config, report=None) -> int:
    """Bytes the decoder self-attention cache holds per generated token (all layers, fp32)."""
    if report is not None:
        return report.state_bytes_per_frame_after
    return 2 * config.d_model * config.decoder_layers * 4


def _layer_sizes(report) -> list[int] | None:
    """Per-layer latent sizes of an MLA budget conversion (from the layer reports)."""
    spec = report.spec or {}
    if spec.get("cache_budget") is None:
        return None
    # a joint latent holds latent_dim values per token and layer
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(report.dtype).removeprefix("torch."), 4)
    return [layer.state_bytes_per_frame_after // itemsize for layer in report.layers]


def run_variants(
    variants: Sequence[Variant],
    *,
    base: str = BUNDLED_WHISPER,
    data: str | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    checkpoints_dir: str | Path = "checkpoints/demo",
    results_dir: str | Path = "results/demo",
    progress: bool = True,
    calibration_samples: int | None = None,
    announce: Callable[[str], None] | None = None,
) -> tuple[list[dict], Path]:
    """Convert every variant, evaluate all of them in one run, return the table rows and the JSON.

    Calibrated variants with the same sources share one calibration pass: ``convert_checkpoint``
    keeps the decoded calibration batches of the last (model, sources, samples) it saw.
    ``announce`` receives one line per step (progress for the CLI).
    """
    say = announce or logger.info
    base_dir = resolve_model_id(base)
    config = load_config(base_dir)
    evaluation_ids = _evaluation_ids(data, splits) if any(v.calibration for v in variants) else []
    base_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base.removeprefix("bundled:")).strip("-")
    conversions = [v for v in variants if v.spec is not None]
    model_ids, cache_bytes, calibration_seconds, convert_seconds, extras = [], [], [], [], []
    calibrated_seen = False
    for variant in variants:
        if variant.spec is None:
            model_ids.append(base_dir)
            cache_bytes.append(_decoder_cache_bytes(config))
            calibration_seconds.append(None)
            convert_seconds.append(None)
            extras.append({})
            continue
        index = conversions.index(variant) + 1
        first_calibrated = bool(variant.calibration) and not calibrated_seen
        calibrated_seen = calibrated_seen or bool(variant.calibration)
        say(
            f"[{index}/{len(conversions)}] converting {variant.name}"
            + (" (first calibrated row: decoding the calibration audio)" if first_calibrated else "")
        )
        output = Path(checkpoints_dir) / f"{base_name}-{variant.name}"
        started = time.perf_counter()
        report = convert_checkpoint(
            base_dir,
            variant.spec,
            output,
            overwrite=True,
            targets=list(variant.targets),
            calibration=list(variant.calibration) or None,
            calibration_samples=calibration_samples,
            calibration_text=variant.calibration_text,
            exclude_ids=evaluation_ids,
            progress=False,
            **_CONVERT_OPTIONS,
        )
        seconds = time.perf_counter() - started
        say(f"[{index}/{len(conversions)}] {variant.name}: {seconds:.0f} s -> {output}")
        calibration_seconds.append(report.calibration_seconds if variant.calibration else None)
        convert_seconds.append(seconds)
        model_ids.append(str(output))
        cache_bytes.append(_decoder_cache_bytes(config, report) if variant.targets == ("decoder",) else None)
        extra: dict = {}
        if variant.calibration:
            extra["calibration"] = {
                "sources": list(report.calibration_sources),
                "fit_utterances": len(report.calibration_ids),
                "held_out_utterances": len(report.held_out_ids),
            }
        sizes = _layer_sizes(report)
        if sizes:
            extra["layer_latent_dims"] = sizes
        extras.append(extra)
    say(f"evaluating {len(model_ids)} models on {', '.join(splits)}" + (f" (first {limit} each)" if limit else ""))
    payload, path = evaluate_models(
        model_ids,
        splits,
        data=data,
        batch_size=batch_size,
        limit=limit,
        device=device,
        results_dir=results_dir,
        progress=progress,
    )
    by_model = {(entry["model"], entry["split"]): entry for entry in payload["results"]}
    rows = []
    for variant, model_id, per_token, cal_seconds, conv_seconds, extra in zip(
        variants, model_ids, cache_bytes, calibration_seconds, convert_seconds, extras, strict=True
    ):
        row = {
            "variant": variant.name,
            "description": variant.description,
            "series": variant.group,
            "model": model_id,
            "decoder_cache_bytes_per_token": per_token,
            "calibration_seconds": cal_seconds,
            "convert_seconds": conv_seconds,
            **extra,
            "splits": {},
        }
        for split in splits:
            entry = by_model.get((model_id, split), {})
            row["splits"][split] = {
                key: entry.get(key)
                for key in (
                    "wer",
                    "cer",
                    "utterances",
                    "substitutions",
                    "deletions",
                    "insertions",
                    "reference_words",
                    "generation_limit_hits",
                    "wall_seconds",
                )  # fmt: skip
            }
        rows.append(row)
    return rows, path


def run_demo(
    plan: DemoPlan, *, device: str = "auto", progress: bool = True, announce: Callable[[str], None] | None = None
) -> tuple[list[dict], Path, str, float]:
    """Run a checked plan: ``(rows, evaluation JSON, notes for the report, seconds)``."""
    started = time.perf_counter()
    rows, journal = run_variants(
        plan.variants,
        base=plan.base,
        data=plan.data,
        splits=plan.splits,
        limit=plan.limit,
        batch_size=plan.batch_size,
        device=device,
        checkpoints_dir=plan.checkpoints_dir,
        results_dir=plan.output_dir / f"{DEMO_NAME}_runs",
        progress=progress,
        calibration_samples=plan.calibration_samples,
        announce=announce,
    )
    seconds = time.perf_counter() - started
    return rows, journal, demo_notes(plan, rows, journal, seconds), seconds


def demo_notes(plan: DemoPlan, rows: Sequence[dict], journal: Path, seconds: float) -> str:
    """The report's notes: the method, the calibration data actually used, the data and the run."""
    notes = DEMO_NOTES
    calibrated = next((row["calibration"] for row in rows if row.get("calibration")), None)
    if calibrated:
        total = calibrated["fit_utterances"] + calibrated["held_out_utterances"]
        notes += (
            f"Calibration audio: {', '.join(calibrated['sources'])}: {total} utterances "
            f"({calibrated['fit_utterances']} fitted, {calibrated['held_out_utterances']} held out for the budget "
            "search), decoded label-free (the model's own greedy transcripts), one pass shared by every calibrated "
            "row; checked by id to share no utterance with the evaluated splits.\n"
        )
    budgets = [row for row in rows if row.get("layer_latent_dims")]
    if budgets:
        notes += (
            "Per-layer latent sizes chosen under the budgets: "
            + "; ".join(f"{row['variant']} {'/'.join(map(str, row['layer_latent_dims']))}" for row in budgets)
            + ".\n"
        )
    limit = f", first {plan.limit} utterances of each split" if plan.limit else ""
    notes += f"Data: {plan.data}{limit}; evaluation journal `{journal}`; {seconds:.0f} s in all.\n\n"
    return notes


def _evaluation_ids(data: str | None, splits: Sequence[str]) -> list[str]:
    """Utterance ids of the evaluation data (a local root); calibration must not share any."""
    from .data import iter_local_index, resolve_source

    source = resolve_source(data)
    if str(source) == "hub":
        return []  # Hub calibration is dev-clean, disjoint from the test splits by construction
    return [row["id"] for split in splits for row in iter_local_index(source, split)]


# ------------------------------------------------------------------------------------------ reports


_TIME_COLUMNS = {"calibration_seconds": "calibration s", "convert_seconds": "convert s"}


def format_markdown(rows: Sequence[dict], splits: Sequence[str], time_column: str = "calibration_seconds") -> str:
    """A Markdown table: WER (S/D/I, generation-limit hits) per split and cache bytes per token.

    ``time_column`` (``calibration_seconds`` or ``convert_seconds``) is shown when any row has it.
    """
    original = rows[0]["decoder_cache_bytes_per_token"] if rows else None
    timed = any(row.get(time_column) is not None for row in rows)
    header = ["variant", "decoder K/V cache B/token"] + ([_TIME_COLUMNS[time_column]] if timed else [])
    for split in splits:
        header += [f"{split} WER %", f"{split} S/D/I", f"{split} at limit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        per_token = row["decoder_cache_bytes_per_token"]
        cache = (
            "-" if per_token is None else f"{per_token}" + (f" ({100 * per_token / original:.1f}%)" if original else "")
        )
        cells = [f"{row['variant']}: {row['description']}", cache]
        if timed:
            seconds = row.get(time_column)
            cells.append("-" if seconds is None else f"{seconds:.0f}")
        for split in splits:
            result = row["splits"][split]
            wer = "-" if result["wer"] is None else f"{100 * result['wer']:.2f}"
            sdi = (
                "-"
                if result["substitutions"] is None
                else (f"{result['substitutions']}/{result['deletions']}/{result['insertions']}")
            )
            limit = result["generation_limit_hits"]
            cells += [wer, sdi, "-" if limit is None else f"{limit}/{result['utterances']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], splits: Sequence[str], path: Path, title: str | None = None) -> None:
    """WER against decoder cache bytes per token: one line (with markers) per series and split.

    Series (``row["series"]``, else the variant name) are told apart by colour and marker, splits by
    line style (solid, dashed, ...) and filled / hollow markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = list(dict.fromkeys(row.get("series") or row["variant"] for row in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "*osD^vP<>X"
    styles = ("-", "--", ":", "-.")
    figure, axis = plt.subplots(figsize=(8, 5))
    sizes: set[int] = set()
    for split_index, split in enumerate(splits):
        for series_index, name in enumerate(series):
            points = sorted(
                (row["decoder_cache_bytes_per_token"], 100 * row["splits"][split]["wer"], row["variant"])
                for row in rows
                if (row.get("series") or row["variant"]) == name
                and row["decoder_cache_bytes_per_token"]
                and row["splits"][split]["wer"] is not None
            )
            if not points:
                continue
            colour = colours[series_index % len(colours)]
            sizes.update(int(p[0]) for p in points)
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                linestyle=styles[split_index % len(styles)],
                marker=markers[series_index % len(markers)],
                markersize=9 if markers[series_index % len(markers)] == "*" else 6,
                color=colour,
                markerfacecolor=colour if split_index == 0 else "white",
                label=f"{name}, {split}",
            )
            for x, y, variant in points if split_index == 0 else ():
                axis.annotate(variant, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.set_xscale("log", base=2)
    if sizes:  # the cache sizes measured, in bytes, instead of powers of two
        axis.set_xticks(sorted(sizes), [str(size) for size in sorted(sizes)])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_yscale("log")
    axis.set_xlabel("decoder K/V cache bytes per generated token (all layers, fp32)")
    axis.set_ylabel("WER % (log scale)")
    axis.set_title(title or "Whisper tiny.en: WER vs. decoder cache size, no fine-tuning", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(
    rows: Sequence[dict],
    splits: Sequence[str],
    directory: Path,
    name: str,
    title: str,
    notes: str = "",
    time_column: str = "calibration_seconds",
) -> tuple[Path, Path, Path]:
    """``NAME.md`` (table), ``NAME.png`` (plot) and ``NAME.json`` (rows) in ``directory``."""
    directory = Path(directory)
    paths = (directory / f"{name}.md", directory / f"{name}.png", directory / f"{name}.json")
    with atomic_file(paths[0]) as markdown:
        markdown.write_text(f"# {title}\n\n{notes}{format_markdown(rows, splits, time_column)}\n")
    with atomic_file(paths[1]) as picture:
        plot(rows, splits, picture, title)
    with atomic_file(paths[2]) as raw:
        raw.write_text(json.dumps(list(rows), indent=2))
    return paths
