"""The demo's rows: which conversions it compares (plain and calibrated MLA, budgets, GQA), their names and series."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..data.holdout import EVALUATION_SPLITS
from ..errors import MlaConvertError
from ..specs import AttentionSpec, GQASpec, LinearSpec, MLASpec, spec_to_dict

logger = logging.getLogger(__name__)


DEFAULT_LATENT_DIMS = (384, 192, 96, 48)
QUICK_LATENT_DIMS = (96,)
DEFAULT_SPLITS = EVALUATION_SPLITS
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

DEMO_NOTES = """The bundled Whisper tiny.en, decoder self-attention converted, no fine-tuning, greedy decoding,
Whisper's English normaliser. Plain rows: MLA seeded by a truncated SVD of [W_k; W_v] (d_c 384 is
lossless: the exactness row). Calibrated rows (the toolkit's defaults with `--calibration`): MLA by a
whitened joint SVD with the attention objective (keys weighed by the queries that read them, values by
the output projection), either one latent size for every layer ("-cal") or the same total cache under
`--cache-budget` with per-layer sizes chosen by the measured output divergence on held-out calibration
audio ("budget"); GQA with heads grouped by activation similarity, each group sharing one key and one value
subspace fitted on the calibration inputs (each query head and output slice absorbs its own map into it).
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
