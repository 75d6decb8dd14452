"""``mla-convert compare``: one table out of many runs' JSONs, with plots.

It reads what the other commands write: ``evaluate`` results (WER per split, K/V-state bytes),
``conversion_report.json`` (state before / after), ``finetune_summary.json`` (WER before / after)
and ``profile`` payloads (measured state, forward time per length, memory, decode throughput).
Rows are keyed by the model (its resolved path when it is a local directory, else its id), so
the same model met in several files becomes one row. The baseline (``--baseline``, else the first
unconverted model) is what the summary's changes are relative to.

Writes ``comparison.csv`` (every column), ``summary.md`` (the readable table) and the plots the
data allows: ``wer_vs_cache.png`` (with the Pareto frontier), ``time_vs_length.png``,
``memory.png`` and ``decode_throughput.png``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import MlaConvertError
from ..io import atomic_files_into, read_json_file
from .profile import PROFILE_KIND


class CompareError(MlaConvertError):
    """Inputs compare cannot read or merge (one line)."""


def model_key(model: str | None, path: str | None = None) -> str:
    """One name per model: its resolved directory when it is one, else the id as given."""
    for candidate in (path, model):
        if candidate and Path(candidate).expanduser().is_dir():
            return str(Path(candidate).expanduser().resolve())
    return str(model or path)


def kind_of(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    if payload.get("kind") == PROFILE_KIND:
        return "profile"
    if isinstance(payload.get("results"), list) and "config" in payload:
        return "evaluation"
    if "totals" in payload and "layers" in payload:
        return "conversion"
    if "steps" in payload and "output" in payload and "wer" in payload:
        return "finetune"
    return None


class Table:
    """Rows of merged facts, one per model, in the order models were first met."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def row(self, model: str | None, path: str | None = None) -> dict[str, Any]:
        key = model_key(model, path)
        if key not in self.rows:
            self.rows[key] = {"model": key, "label": Path(key).name or key}
        return self.rows[key]

    # -- readers, one per JSON kind ---------------------------------------------------------------
    def add_evaluation(self, payload: dict) -> None:
        for entry in payload["results"]:
            row = self.row(entry.get("model"), entry.get("path"))
            row["label"] = Path(str(entry.get("model"))).name or row["label"]
            split = entry.get("split")
            row[f"wer_{split}"] = entry.get("wer")
            row[f"utterances_{split}"] = entry.get("utterances")
            if entry.get("peak_memory_bytes") is not None:
                row[f"eval_peak_memory_bytes_{split}"] = entry["peak_memory_bytes"]
            self._attention(row, entry.get("attention"))
            for name in ("kv_state_bytes_per_frame", "kv_state_bytes_per_frame_mha"):
                if entry.get(name) is not None:
                    row[name] = entry[name]
            if entry.get("kv_state_bytes_per_frame_by_role"):
                row["kv_state_bytes_by_role"] = entry["kv_state_bytes_per_frame_by_role"]

    def add_conversion(self, payload: dict, path: Path) -> None:
        row = self.row(str(path.parent), str(path.parent))
        totals = payload["totals"]
        row["conversion_state_ratio"] = totals.get("state_ratio")
        row["conversion_bytes_before"] = totals.get("state_bytes_per_frame_before")
        row["conversion_bytes_after"] = totals.get("state_bytes_per_frame_after")
        self._attention(row, payload.get("spec"))

    def add_finetune(self, payload: dict) -> None:
        row = self.row(payload["output"], payload["output"])
        row["finetune_steps"] = payload.get("steps")
        for split, wers in (payload.get("wer") or {}).items():
            row[f"finetune_wer_before_{split}"] = wers.get("before")
            row[f"wer_{split}"] = wers.get("after", row.get(f"wer_{split}"))

    def add_profile(self, payload: dict) -> None:
        settings = payload.get("settings", {})
        for entry in payload["models"]:
            row = self.row(entry.get("model"), entry.get("path"))
            row["label"] = Path(str(entry.get("model"))).name or row["label"]
            self._attention(row, entry.get("attention"))
            row["parameters"] = entry.get("parameters")
            by_role = entry["kv_state_formula"]["bytes_per_position_by_role"]
            row["kv_state_bytes_by_role"] = by_role
            row["kv_state_bytes_per_frame"] = sum(by_role.values())
            row["kv_state_matches_formula"] = entry.get("kv_state_matches_formula")
            row["profile_batch_size"] = settings.get("batch_size")
            row["profile_device"] = entry.get("device")
            row["forward"] = {float(r["input_seconds"]): r for r in entry.get("forward", [])}
            row["decode"] = {int(r["new_tokens"]): r for r in entry.get("decode", [])}

    @staticmethod
    def _attention(row: dict, attention: Any) -> None:
        if isinstance(attention, dict):
            row["attention"] = _describe(attention)
        elif attention and not row.get("attention"):
            row["attention"] = str(attention)
        row.setdefault("attention", "mha")


def _describe(spec: dict) -> str:
    kind = spec.get("attention") or spec.get("type") or "?"
    for name in ("latent_dim", "kv_heads", "feature_map", "cache_budget"):
        if spec.get(name) is not None:
            return f"{kind} {name.replace('_', ' ')} {spec[name]}"
    return str(kind)


def read_inputs(paths: Sequence[str | Path]) -> Table:
    table = Table()
    used = 0
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise CompareError(f"{path} does not exist (compare reads JSON files)")
        payload = read_json_file(path, str(path))
        kind = kind_of(payload)
        if kind is None:
            continue  # other JSONs under results/ (a plot's data, a journal's header) are not ours to merge
        used += 1
        if kind == "evaluation":
            table.add_evaluation(payload)
        elif kind == "conversion":
            table.add_conversion(payload, path)
        elif kind == "finetune":
            table.add_finetune(payload)
        else:
            table.add_profile(payload)
    if not used:
        raise CompareError(
            "none of the files is an evaluation, conversion-report, fine-tuning or profile JSON of mla_convert"
        )
    return table


def choose_baseline(table: Table, baseline: str | None) -> dict | None:
    rows = list(table.rows.values())
    if baseline is not None:
        key = model_key(baseline)
        for row in rows:
            if row["model"] == key or row["label"] == baseline:
                return row
        raise CompareError(f"--baseline {baseline} is not one of the compared models: {[r['label'] for r in rows]}")
    return next((row for row in rows if row.get("attention") in (None, "mha")), None)


def splits_of(rows: Sequence[dict]) -> list[str]:
    return sorted({key[4:] for row in rows for key in row if key.startswith("wer_")})


def flat_rows(table: Table) -> list[dict]:
    """Every row as flat CSV columns (forward / decode spelled out per length)."""
    flat = []
    for row in table.rows.values():
        out = {key: value for key, value in row.items() if key not in ("forward", "decode", "kv_state_bytes_by_role")}
        for role, value in (row.get("kv_state_bytes_by_role") or {}).items():
            out[f"kv_state_bytes_{role}"] = value
        for seconds, result in sorted((row.get("forward") or {}).items()):
            out[f"forward_s_{seconds:g}s"] = result["median_s"]
            out[f"peak_memory_bytes_{seconds:g}s"] = result["peak_memory_bytes"]
        for tokens, result in sorted((row.get("decode") or {}).items()):
            out[f"generate_s_{tokens}"] = result["median_s"]
            out[f"decode_tokens_per_s_{tokens}"] = result["decode_tokens_per_s"]
        flat.append(out)
    return flat


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _ratio(value, base) -> str:
    if value is None or base in (None, 0):
        return ""
    return f" ({value / base:.2f}×)"


def _cell(value, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


def summary_markdown(table: Table, baseline: dict | None) -> str:
    rows = list(table.rows.values())
    splits = splits_of(rows)
    lengths = sorted({s for row in rows for s in (row.get("forward") or {})})
    tokens = sorted({n for row in rows for n in (row.get("decode") or {})})
    header = ["model", "attention", "parameters (M)", "K/V bytes per position"]
    header += [f"WER {split} %" for split in splits]
    header += [f"forward {s:g} s (ms)" for s in lengths]
    header += ["peak memory (MiB)"] if lengths else []
    header += [f"decode tok/s @{n}" for n in tokens]
    lines = [
        "# Comparison",
        "",
        f"Baseline: {baseline['label'] if baseline else 'none (no unconverted model among the inputs)'}; "
        "in brackets, each value over the baseline's (WER: the change in points).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    base = baseline or {}
    for row in rows:
        cells = [row["label"], row.get("attention", "mha")]
        cells.append(_cell(row.get("parameters"), 1e-6))
        cache = row.get("kv_state_bytes_per_frame")
        cells.append(("-" if cache is None else str(cache)) + _ratio(cache, base.get("kv_state_bytes_per_frame")))
        for split in splits:
            wer, base_wer = row.get(f"wer_{split}"), base.get(f"wer_{split}")
            change = "" if wer is None or base_wer is None or row is base else f" ({100 * (wer - base_wer):+.2f})"
            cells.append(_cell(wer, 100) + change)
        for seconds in lengths:
            value = (row.get("forward") or {}).get(seconds, {}).get("median_s")
            base_value = (base.get("forward") or {}).get(seconds, {}).get("median_s")
            cells.append(_cell(value, 1000, 1) + _ratio(value, base_value))
        if lengths:
            longest = (row.get("forward") or {}).get(lengths[-1], {}).get("peak_memory_bytes")
            base_memory = (base.get("forward") or {}).get(lengths[-1], {}).get("peak_memory_bytes")
            cells.append(_cell(longest, 2**-20, 1) + _ratio(longest, base_memory))
        for count in tokens:
            value = (row.get("decode") or {}).get(count, {}).get("decode_tokens_per_s")
            base_value = (base.get("decode") or {}).get(count, {}).get("decode_tokens_per_s")
            cells.append(_cell(value, 1, 1) + _ratio(value, base_value))
        lines.append("| " + " | ".join(cells) + " |")
    if lengths:
        kinds = {r["memory_kind"] for row in rows for r in (row.get("forward") or {}).values()}
        lines += ["", f"Peak memory is the forward at {lengths[-1]:g} s ({', '.join(sorted(kinds))})."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both smaller cache and lower WER, by cache size."""
    front, best = [], float("inf")
    for cache, wer in sorted(points):
        if wer < best:
            front.append((cache, wer))
            best = wer
    return front


def plot_wer_vs_cache(rows: Sequence[dict], split: str, path: Path) -> bool:
    points = [(row["kv_state_bytes_per_frame"], 100 * row[f"wer_{split}"], row["label"]) for row in rows
              if row.get("kv_state_bytes_per_frame") and row.get(f"wer_{split}") is not None]  # fmt: skip
    if len(points) < 2:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter([p[0] for p in points], [p[1] for p in points], zorder=3)
    for cache, wer, label in points:
        axis.annotate(label, (cache, wer), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front([(p[0], p[1]) for p in points])
    axis.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", label="Pareto frontier")
    axis.set_xscale("log")
    axis.set_xlabel("K/V-state bytes per position (all layers)")
    axis.set_ylabel(f"WER on {split} (%)")
    axis.set_title("WER against cache size")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_lines(rows: Sequence[dict], field: str, value: str, scale: float, xlabel: str, ylabel: str,
               title: str, path: Path) -> bool:  # fmt: skip
    series = [(row["label"], sorted((x, r[value] * scale) for x, r in (row.get(field) or {}).items()))
              for row in rows if row.get(field)]  # fmt: skip
    if not series:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, points in series:
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_memory(rows: Sequence[dict], path: Path) -> bool:
    bars = []
    for row in rows:
        forward = row.get("forward") or {}
        if forward:
            longest = max(forward)
            if forward[longest].get("peak_memory_bytes") is not None:
                bars.append((row["label"], forward[longest]["peak_memory_bytes"] / 2**20, longest))
    if not bars:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.bar(range(len(bars)), [b[1] for b in bars])
    axis.set_xticks(range(len(bars)), [f"{b[0]}\n({b[2]:g} s)" for b in bars], fontsize=8)
    axis.set_ylabel("peak memory of one forward (MiB)")
    axis.set_title("Memory per variant")
    axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def compare_results(
    inputs: Sequence[str | Path], output: str | Path = "results/comparison", baseline: str | None = None
) -> list[Path]:
    """Merge the JSONs, write the CSV, the summary and the plots into ``output``; their paths."""
    table = read_inputs(inputs)
    chosen = choose_baseline(table, baseline)
    rows = list(table.rows.values())
    output = Path(output)
    with atomic_files_into(output) as staging:
        write_csv(flat_rows(table), staging / "comparison.csv")
        (staging / "summary.md").write_text(summary_markdown(table, chosen), encoding="utf-8")
        splits = splits_of(rows)
        if splits:
            plot_wer_vs_cache(rows, splits[0], staging / "wer_vs_cache.png")
        plot_lines(rows, "forward", "median_s", 1000, "input length (s)", "forward time (ms)",
                   "Forward time against input length", staging / "time_vs_length.png")  # fmt: skip
        plot_memory(rows, staging / "memory.png")
        plot_lines(rows, "decode", "decode_tokens_per_s", 1, "generated tokens (context length)",
                   "decode tokens/s", "Decode throughput against context length",
                   staging / "decode_throughput.png")  # fmt: skip
        names = sorted(entry.name for entry in staging.iterdir() if not entry.name.startswith("."))
    return [output / name for name in names if (output / name).exists()]
