"""The README's main job: convert the bundled Whisper tiny.en and measure what each conversion costs.

Each variant is converted from the imported original (decoder self-attention by default, the
part whose cache grows with every generated token), saved under ``checkpoints/``, and all of them
are evaluated in one ``evaluate_models`` run (resumable). The table gives WER, the error split
into substitutions / deletions / insertions, how many utterances hit the generation limit (a
looping decoder), and the decoder K/V-cache bytes per generated token; a plot shows WER against
cache size.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import convert_checkpoint
from .ct2 import BUNDLED_WHISPER
from .evaluate import evaluate_models
from .io import atomic_file
from .loading import load_config, resolve_model_id
from .specs import AttentionSpec, GQASpec, LinearSpec, MLASpec, spec_to_dict

logger = logging.getLogger(__name__)

DEFAULT_LATENT_DIMS = (384, 192, 96, 48)
DEFAULT_SPLITS = ("test-clean", "test-other")
DEMO_NOTES = """The bundled Whisper tiny.en, decoder self-attention converted to MLA (joint K/V latent seeded
by a truncated SVD of [W_k; W_v]), no fine-tuning, greedy decoding, Whisper's English normaliser.
"S/D/I" are substitutions / deletions / insertions; "at limit" counts utterances whose generation
hit the token limit (a looping decoder). Cache: decoder self-attention K/V state per generated
token, all layers, fp32.

"""


@dataclass(frozen=True)
class Variant:
    """One row of the table: a name and the conversion that makes it (``None``: the original)."""

    name: str
    spec: AttentionSpec | None = None
    targets: tuple[str, ...] = ("decoder",)
    calibration: tuple[str, ...] = ()
    calibration_text: bool = False

    @property
    def description(self) -> str:
        if self.spec is None:
            return "original (MHA)"
        details = ", ".join(f"{k}={v}" for k, v in spec_to_dict(self.spec).items() if k != "attention")
        if self.calibration:
            details += ", calibrated on " + ("transcripts" if self.calibration_text else "own greedy output")
        return f"{self.spec.attention.upper()} ({details}) on {'+'.join(self.targets)}"


def mla_variants(latent_dims: Sequence[int] = DEFAULT_LATENT_DIMS) -> list[Variant]:
    return [Variant("original")] + [Variant(f"mla-{d}", MLASpec(latent_dim=d)) for d in latent_dims]


def table_variants(
    latent_dims: Sequence[int] = DEFAULT_LATENT_DIMS, kv_heads: Sequence[int] = (3, 2, 1)
) -> list[Variant]:
    """The Whisper issue's full table: MLA sizes, GQA sizes and linear attention."""
    gqa = [Variant(f"gqa-{g}", GQASpec(kv_heads=g)) for g in kv_heads]
    return mla_variants(latent_dims) + gqa + [Variant("linear-elu", LinearSpec())]


def _decoder_cache_bytes(config, report=None) -> int:
    """Bytes the decoder self-attention cache holds per generated token (all layers, fp32)."""
    if report is not None:
        return report.state_bytes_per_frame_after
    return 2 * config.d_model * config.decoder_layers * 4


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
) -> tuple[list[dict], Path]:
    """Convert every variant, evaluate all of them in one run, return the table rows and the JSON."""
    base_dir = resolve_model_id(base)
    config = load_config(base_dir)
    evaluation_ids = _evaluation_ids(data, splits) if any(v.calibration for v in variants) else []
    base_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base.removeprefix("bundled:")).strip("-")
    model_ids, cache_bytes, calibration_seconds = [], [], []
    for variant in variants:
        if variant.spec is None:
            model_ids.append(base_dir)
            cache_bytes.append(_decoder_cache_bytes(config))
            calibration_seconds.append(None)
            continue
        output = Path(checkpoints_dir) / f"{base_name}-{variant.name}"
        report = convert_checkpoint(
            base_dir,
            variant.spec,
            output,
            overwrite=True,
            targets=list(variant.targets),
            calibration=list(variant.calibration) or None,
            calibration_samples=None,
            calibration_text=variant.calibration_text,
            exclude_ids=evaluation_ids,
            progress=False,
        )
        calibration_seconds.append(report.calibration_seconds if variant.calibration else None)
        model_ids.append(str(output))
        cache_bytes.append(_decoder_cache_bytes(config, report) if variant.targets == ("decoder",) else None)
        logger.info("converted %s: %s", variant.name, output)
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
    for variant, model_id, per_token, seconds in zip(
        variants, model_ids, cache_bytes, calibration_seconds, strict=True
    ):
        row = {"variant": variant.name, "description": variant.description, "model": model_id,
               "decoder_cache_bytes_per_token": per_token, "calibration_seconds": seconds, "splits": {}}  # fmt: skip
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


def _evaluation_ids(data: str | None, splits: Sequence[str]) -> list[str]:
    """Utterance ids of the evaluation data (a local root); calibration must not share any."""
    from .data import iter_local_index, resolve_source

    source = resolve_source(data)
    if str(source) == "hub":
        return []  # Hub calibration is dev-clean, disjoint from the test splits by construction
    return [row["id"] for split in splits for row in iter_local_index(source, split)]


def format_markdown(rows: Sequence[dict], splits: Sequence[str]) -> str:
    """A Markdown table: WER (S/D/I, generation-limit hits) per split and cache bytes per token."""
    original = rows[0]["decoder_cache_bytes_per_token"] if rows else None
    calibrated = any(row.get("calibration_seconds") is not None for row in rows)
    header = ["variant", "decoder K/V cache B/token"] + (["calibration s"] if calibrated else [])
    for split in splits:
        header += [f"{split} WER %", f"{split} S/D/I", f"{split} at limit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        per_token = row["decoder_cache_bytes_per_token"]
        cache = (
            "-" if per_token is None else f"{per_token}" + (f" ({100 * per_token / original:.1f}%)" if original else "")
        )
        cells = [f"{row['variant']}: {row['description']}", cache]
        if calibrated:
            seconds = row.get("calibration_seconds")
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


def plot(rows: Sequence[dict], splits: Sequence[str], path: Path) -> None:
    """WER against decoder cache bytes per token, one marker series per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (split, marker) in enumerate(zip(splits, "os^v", strict=False)):
        points = [
            (row["decoder_cache_bytes_per_token"], 100 * row["splits"][split]["wer"], row["variant"])
            for row in rows
            if row["decoder_cache_bytes_per_token"] and row["splits"][split]["wer"] is not None
        ]
        if not points:
            continue
        axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=split)
        for x, y, name in points if index == 0 else ():
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("decoder K/V cache bytes per generated token (all layers, fp32)")
    axis.set_ylabel("WER % (log scale)")
    axis.set_title("Whisper tiny.en: WER vs. decoder cache size, no fine-tuning")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(
    rows: Sequence[dict], splits: Sequence[str], directory: Path, name: str, title: str, notes: str = ""
) -> tuple[Path, Path, Path]:
    """``NAME.md`` (table), ``NAME.png`` (plot) and ``NAME.json`` (rows) in ``directory``."""
    paths = (directory / f"{name}.md", directory / f"{name}.png", directory / f"{name}.json")
    with atomic_file(paths[0]) as markdown:
        markdown.write_text(f"# {title}\n\n{notes}{format_markdown(rows, splits)}\n")
    with atomic_file(paths[1]) as picture:
        plot(rows, splits, picture)
    with atomic_file(paths[2]) as raw:
        raw.write_text(json.dumps(list(rows), indent=2))
    return paths
