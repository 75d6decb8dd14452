"""``mla-convert demo``, the README's main job: convert the bundled Whisper tiny.en and measure what
each conversion costs.

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

from .plan import DemoPlan, calibration_sources, plan_demo
from .report import format_markdown, plot, write_report
from .run import demo_notes, run_demo, run_variants
from .variants import (
    BUDGET,
    CALIBRATED,
    DEFAULT_KV_HEADS,
    DEFAULT_LATENT_DIMS,
    DEFAULT_SPLITS,
    DEMO_NAME,
    DEMO_TITLE,
    GQA_CALIBRATED,
    ORIGINAL,
    PLAIN,
    QUICK_LATENT_DIMS,
    QUICK_LIMIT,
    QUICK_SPLITS,
    DemoError,
    Variant,
    budget_fraction,
    demo_variants,
    mla_variants,
    table_variants,
)

__all__ = [
    "BUDGET",
    "CALIBRATED",
    "DEFAULT_KV_HEADS",
    "DEFAULT_LATENT_DIMS",
    "DEFAULT_SPLITS",
    "DEMO_NAME",
    "DEMO_TITLE",
    "GQA_CALIBRATED",
    "ORIGINAL",
    "PLAIN",
    "QUICK_LATENT_DIMS",
    "QUICK_LIMIT",
    "QUICK_SPLITS",
    "DemoError",
    "DemoPlan",
    "Variant",
    "budget_fraction",
    "calibration_sources",
    "demo_notes",
    "demo_variants",
    "format_markdown",
    "mla_variants",
    "plan_demo",
    "plot",
    "run_demo",
    "run_variants",
    "table_variants",
    "write_report",
]
