#!/usr/bin/env python
"""The comparison table of a fine-tuning run: original (teacher) / converted / converted + fine-tuned,
WER with substitutions / deletions / insertions and generation-limit hits per test split, the K/V
cache per token, and what the fine-tune did. Reads RUN_DIR/evaluation.json and finetune_summary.json
(written by ``mla-convert finetune``); writes OUTPUT (.md) with a .png plot and a .json beside it.

    python scripts/finetune_table.py RUN_DIR [--config configs/quick.json] [--output results/x.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mla_convert.demo import write_report

SPLIT_KEYS = ("wer", "cer", "utterances", "substitutions", "deletions", "insertions", "reference_words",
              "generation_limit_hits", "wall_seconds")  # fmt: skip


def state_bytes(converted_dir: Path) -> tuple[int | None, int | None]:
    """K/V state per token of the converted layers, (before, after), from the conversion report."""
    report = converted_dir / "conversion_report.json"
    if not report.is_file():
        return None, None
    totals = json.loads(report.read_text())["totals"]
    return totals["state_bytes_per_frame_before"], totals["state_bytes_per_frame_after"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--config", type=Path, help="the recipe that produced the run (its description is quoted)")
    parser.add_argument("--output", type=Path, required=True, help="Markdown file to write")
    args = parser.parse_args()
    summary = json.loads((args.run_dir / "finetune_summary.json").read_text())
    evaluation = json.loads((args.run_dir / "evaluation.json").read_text())
    roles = [("original", summary["teacher"], "original (MHA)"),
             ("converted", summary["model"], "converted, no fine-tuning"),
             ("converted+FT", summary["output"], "converted + fine-tuned")]  # fmt: skip
    splits = list(dict.fromkeys(row["split"] for row in evaluation["results"]))
    by_model = {(row["model"], row["split"]): row for row in evaluation["results"]}
    before, after = state_bytes(Path(summary["model"]))
    per_token = {"original": before, "converted": after, "converted+FT": after}
    rows = []
    for name, model, description in roles:
        if model is None:
            continue
        row = {"variant": name, "description": description, "model": model,
               "decoder_cache_bytes_per_token": per_token[name], "splits": {}}  # fmt: skip
        for split in splits:
            entry = by_model.get((model, split), {})
            row["splits"][split] = {key: entry.get(key) for key in SPLIT_KEYS}
        rows.append(row)
    recipe = json.loads(args.config.read_text()) if args.config else {}
    losses = summary.get("losses") or []
    first, last = (losses[0], losses[-1]) if losses else ({}, {})
    notes = (
        (f"{recipe['description']}.\n\n" if recipe.get("description") else "")
        + f"Fine-tuning: {summary['steps']} steps ({summary['epochs']} epochs, {summary['samples_seen']} utterances "
        f"seen) on {', '.join(summary['datasets'])}; lr {summary['learning_rate']}, batch {summary['batch_size']} x "
        f"{summary['gradient_accumulation']}, --freeze {summary['freeze']} ({summary['trainable_parameters']:,} "
        f"trainable parameters), distillation weight {summary['distill_weight']}; {summary['precision']} on "
        f"{summary['device']}, {summary['train_seconds']} s. Training loss {first.get('loss', float('nan')):.3f} at "
        f"step {first.get('step')} -> {last.get('loss', float('nan')):.3f} at step {last.get('step')}"
        + (f", {summary['train_loss']:.3f} on average over all steps" if summary.get("train_loss") is not None else "")
        + ". Model "
        f"selection by dev WER: best {100 * (summary.get('best_dev_wer') or 0):.2f}% at "
        f"{summary.get('best_checkpoint')}"
        f"{' (early stopping)' if summary.get('stopped_early') else ''}. "
        'Greedy decoding, Whisper\'s English normaliser; "at limit" counts utterances whose generation hit the '
        "token limit (a looping decoder).\n\n"
    )
    paths = write_report(rows, splits, args.output.parent, args.output.stem, "Fine-tuning recovery", notes)
    print(paths[0].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
