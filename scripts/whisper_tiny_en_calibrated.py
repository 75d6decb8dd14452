#!/usr/bin/env python
"""Calibrated conversions of the bundled Whisper tiny.en decoder self-attention, no fine-tuning:
MLA at d_c 192/96/48 and under a 12.5% cache budget, GQA with kv_heads 3/2/1 and Hedgehog linear
attention (feature maps fitted by attention transfer), all calibrated on the
model's own greedy output over calibration audio that shares no utterance with the evaluation data
(checked by id). Writes results/whisper_tiny_en_calibrated.{md,png,json}; the plain-SVD rows to
compare with are in results/whisper_tiny_en.md (same data, same evaluation).

    python scripts/whisper_tiny_en_calibrated.py --data ../shared/data/LibriSpeech \\
        --calibration ../shared/data/LibriSpeech/dev-clean ../shared/data/other/ljspeech
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mla_convert.demo import DEFAULT_SPLITS, Variant, run_variants, write_report
from mla_convert.specs import GQASpec, LinearSpec, MLASpec

ROWS = ("mla", "budget", "gqa", "linear")
NOTES = """Bundled Whisper tiny.en, decoder self-attention only, no fine-tuning, greedy decoding, Whisper's
English normaliser. MLA options are in each row (defaults omitted: the attention objective, K balanced
against V, damping 1e-4). Calibration: second moments of each layer's K/V input, collected by running
the original model teacher-forced on its own greedy transcripts of the calibration audio (label
free); MLA = whitened joint SVD (damped Cholesky), GQA = heads grouped by activation
similarity and merged by weighted least squares; Hedgehog = linear attention whose learnable
feature maps are trained (300 Adam steps per layer) to reproduce the softmax attention weights.
"calibration s" is the wall time of that pass
(greedy decoding included) on this 2-core CPU while other jobs ran. The budget rows spread that
fraction of the MHA K/V values per token over the 4 layers: each layer alone is converted at
candidate sizes and the model's output divergence (KL) on the held-out calibration utterances is
measured; the sizes with the least summed divergence are kept if, converted together, they beat a
uniform split and the spectral allocation on those held-out utterances (per-layer sizes in the
model's config and conversion_report.json). "at limit": utterances whose generation hit the token limit (looping).

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="hub or a LibriSpeech root (default: $LIBRISPEECH_ROOT, else the Hub)")
    parser.add_argument("--calibration", nargs="+", default=["hub"], help="calibration audio sources")
    parser.add_argument("--split", nargs="+", default=list(DEFAULT_SPLITS))
    parser.add_argument("--limit", type=int)
    parser.add_argument("--output-dir", type=Path, default=Path("results"))
    parser.add_argument("--balance-kv", action=argparse.BooleanOptionalAction, default=True,
                        help="MLA: balance K against V before the SVD (default on)")  # fmt: skip
    parser.add_argument("--damping", type=float, default=1e-4, help="MLA whitening damping (default 1e-4)")
    parser.add_argument("--objective", choices=("kv", "attention"), default="attention", help="MLA objective")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.125], help="MLA cache budgets (0.125)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows (default all)")
    parser.add_argument("--name", default="whisper_tiny_en_calibrated", help="results/NAME.{md,png,json}")
    args = parser.parse_args()
    sources = tuple(args.calibration)
    options = dict(init="calibrated", balance_kv=args.balance_kv, damping=args.damping, objective=args.objective)
    variants = [Variant("original")]
    if "mla" in args.rows:
        variants += [Variant(f"mla-{d}-cal", MLASpec(latent_dim=d, **options), calibration=sources)
                     for d in (192, 96, 48)]  # fmt: skip
    if "budget" in args.rows:
        variants += [
            Variant(f"mla-budget-{100 * budget:g}-cal", MLASpec(cache_budget=budget, **options), calibration=sources)
            for budget in args.budgets
        ]
    if "gqa" in args.rows:
        variants += [Variant(f"gqa-{g}-cal", GQASpec(kv_heads=g, init="calibrated"), calibration=sources)
                     for g in (3, 2, 1)]  # fmt: skip
    if "linear" in args.rows:
        variants.append(Variant("linear-hedgehog", LinearSpec(feature_map="hedgehog"), calibration=sources))
    started = time.perf_counter()
    rows, journal = run_variants(
        variants,
        data=args.data,
        splits=args.split,
        limit=args.limit,
        checkpoints_dir=f"checkpoints/{args.name}",
        results_dir=args.output_dir / f"{args.name}_runs",
    )
    notes = NOTES + (
        f"Calibration audio: {', '.join(sources)}. Data: {args.data or '$LIBRISPEECH_ROOT / the Hub'}; "
        f"evaluation journal `{journal}`; {time.perf_counter() - started:.0f} s in all.\n\n"
    )
    title = "Whisper tiny.en, calibrated conversions"
    paths = write_report(rows, args.split, args.output_dir, args.name, title, notes)
    print(paths[0].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
