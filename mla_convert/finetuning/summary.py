"""The end of a run: the final evaluation, ``finetune_summary.json`` and the end-of-run table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..distributed import is_main
from ..io import atomic_file
from .config import EVALUATION_FILE, SUMMARY_FILE, FinetuneConfig


def evaluate_and_summarise(config: FinetuneConfig, trained: dict[str, Any], size: int | None) -> dict[str, Any]:
    from ..evaluation import evaluate_models

    output = Path(config.output)
    evaluation: dict[str, Any] = {}
    if config.test_splits:
        models = [config.model, str(output)] + ([config.teacher] if config.teacher else [])
        payload, _ = evaluate_models(
            models,
            config.test_splits,
            data=config.test_data,
            batch_size=config.eval_batch_size,
            limit=config.test_limit,
            output=output / EVALUATION_FILE,
            progress=config.progress,
        )
        roles = {config.model: "before", str(output): "after", config.teacher: "teacher"}
        for row in payload["results"]:
            entry = evaluation.setdefault(row["split"], {})
            entry[roles[row["model"]]] = row["wer"]
            if row.get("generation_limit_hits") is not None:
                entry[f"{roles[row['model']]}_generation_limit_hits"] = row["generation_limit_hits"]
    summary = {
        "model": config.model,
        "teacher": config.teacher,
        "output": str(output),
        "datasets": list(config.data) if list(config.data) != ["hub"] else [f"hub:{config.train_split}"],
        "training_utterances": size,
        "steps": trained["steps"],
        "epochs": trained["epochs"],
        "learning_rate": config.lr,
        "batch_size": config.batch_size,
        "gradient_accumulation": config.grad_accum,
        "freeze": config.freeze,
        "distill_weight": 0.0 if not config.teacher else (1.0 if config.distill_only else config.distill_weight),
        "distill_only": config.distill_only,
        **{k: v for k, v in trained.items() if k not in ("steps", "epochs", "losses", "dev_history")},
        "wer": evaluation,
        "dev_history": trained["dev_history"],
        "losses": trained["losses"],
    }
    if is_main():
        with atomic_file(output / SUMMARY_FILE) as temporary:
            temporary.write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: WER before / after fine-tuning (and the teacher's) per test split."""
    lines = [
        f"fine-tuned {summary['model']} -> {summary['output']}: {summary['steps']} steps, "
        f"{summary['samples_seen']} utterances seen, {summary['train_seconds']} s on {summary['device']} "
        f"({summary['precision']})"
    ]
    if summary.get("train_loss") is not None:
        lines.append(f"mean training loss {summary['train_loss']:.4f} over all {summary['steps']} steps")
    if summary.get("best_checkpoint"):
        lines.append(f"best dev WER {100 * summary['best_dev_wer']:.2f}% at {summary['best_checkpoint']}")
    if summary["wer"]:
        lines += ["", "| split | teacher WER % | before WER % | after WER % |", "|---|---|---|---|"]
        for split, row in summary["wer"].items():
            cells = [f"{100 * row[k]:.2f}" if row.get(k) is not None else "-" for k in ("teacher", "before", "after")]
            lines.append(f"| {split} | {' | '.join(cells)} |")
    lines.append(f"summary: {Path(summary['output']) / SUMMARY_FILE}")
    return "\n".join(lines)
