"""The demo's report: a markdown table, a plot of WER against cache size, and the rows as JSON."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_file

logger = logging.getLogger(__name__)


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
