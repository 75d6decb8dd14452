#!/usr/bin/env python
"""The Whisper issue's results table: the bundled Whisper tiny.en, decoder self-attention converted
to MLA (d_c 384/192/96/48), GQA (kv_heads 3/2/1) and linear attention, no fine-tuning, evaluated on
LibriSpeech test-clean and test-other. Writes results/whisper_tiny_en.{md,png,json}.

    python scripts/whisper_tiny_en_table.py [--data PATH] [--limit N]

Offline, ``--data`` (or ``LIBRISPEECH_ROOT``) names a LibriSpeech root in the official layout, e.g.
the shared sample ``../shared/data/LibriSpeech``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mla_convert.demo import DEFAULT_SPLITS, run_variants, table_variants, write_report

NOTES = """Bundled Whisper tiny.en (CTranslate2 weights imported to HF), greedy decoding, no
fine-tuning, Whisper's English text normaliser on both sides. Only the decoder self-attention is
converted (plain weight SVD / neighbour mean-pooling, no calibration). "at limit" counts utterances
whose generation hit the token limit (a looping decoder), which is what drives WER above 100%.
The cache column is the decoder self-attention K/V state per generated token over all 4 layers
in fp32; linear attention still caches keys and values while decoding (see attention_linear.py).

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="hub or a LibriSpeech root (default: $LIBRISPEECH_ROOT, else the Hub)")
    parser.add_argument("--split", nargs="+", default=list(DEFAULT_SPLITS))
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", type=Path, default=Path("results"))
    args = parser.parse_args()
    started = time.perf_counter()
    rows, journal = run_variants(
        table_variants(),
        data=args.data,
        splits=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        checkpoints_dir="checkpoints/whisper_tiny_en",
        results_dir=args.output_dir / "whisper_tiny_en_runs",
    )
    data = args.data or "$LIBRISPEECH_ROOT / the Hub"
    notes = NOTES + f"Data: {data}; evaluation journal: `{journal}`; {time.perf_counter() - started:.0f} s.\n\n"
    paths = write_report(rows, args.split, args.output_dir, "whisper_tiny_en", "Whisper tiny.en conversions", notes)
    print(paths[0].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
