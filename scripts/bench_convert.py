#!/usr/bin/env python
"""Time ``mla-convert convert`` against a plain load+save of the same 0.6B model, side by side.

The model has the exact config of ``facebook/wav2vec2-conformer-rel-pos-large-960h-ft`` (24
layers, hidden 1024, 16 heads, relative positions) with random weights, built in code because the
Hub cannot be reached. Both commands run as fresh processes (interpreter start and imports
included, as a user would see them), alternated ``--repeats`` times; the table gives medians, the
ratio, and each process's peak RSS. Target: ratio <= 1.3.

    python scripts/bench_convert.py [--latent-dim 512] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_FOOTER = (
    "import atexit, resource, sys\n"
    "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "atexit.register(lambda: print('PEAK_RSS_KB', peak(), file=sys.stderr))\n"
)

PLAIN = RSS_FOOTER + (
    "from transformers import AutoModelForCTC\n"
    "model = AutoModelForCTC.from_pretrained(sys.argv[1], dtype='auto')\n"
    "model.save_pretrained(sys.argv[2])\n"
)

CONVERT = RSS_FOOTER + "from mla_convert.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def rel_pos_large_config():
    from transformers import Wav2Vec2ConformerConfig

    return Wav2Vec2ConformerConfig(
        vocab_size=32,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        position_embeddings_type="relative",
        conv_depthwise_kernel_size=31,
        conv_dim=(512,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        max_source_positions=5000,
        architectures=["Wav2Vec2ConformerForCTC"],
    )


def timed(command: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    rss_kb = next(int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, rss_kb / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="where the 2.5 GB model is written (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert."))
    source = workdir / "rel-pos-large-random"
    if not (source / "model.safetensors").is_file() and not (source / "model.safetensors.index.json").is_file():
        import torch
        from transformers import Wav2Vec2ConformerForCTC

        torch.manual_seed(0)
        started = time.perf_counter()
        model = Wav2Vec2ConformerForCTC(rel_pos_large_config())
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(source)
        del model
        print(f"built and saved a {params / 1e6:.1f}M-parameter model in {time.perf_counter() - started:.1f} s")

    plain_times, convert_times, plain_rss, convert_rss = [], [], [], []
    for repeat in range(args.repeats):
        for target in ("plain", "converted"):
            shutil.rmtree(workdir / target, ignore_errors=True)
        seconds, rss = timed([sys.executable, "-c", PLAIN, str(source), str(workdir / "plain")])
        plain_times.append(seconds)
        plain_rss.append(rss)
        command = [
            sys.executable,
            "-c",
            CONVERT,
            "convert",
            str(source),
            "--attention",
            "mla",
            "--latent-dim",
            str(args.latent_dim),
            "--output",
            str(workdir / "converted"),
            "--quiet",
            "--json",
        ]
        seconds, rss = timed(command)
        convert_times.append(seconds)
        convert_rss.append(rss)
        print(f"run {repeat + 1}: load+save {plain_times[-1]:.1f} s, mla-convert convert {convert_times[-1]:.1f} s")

    plain, converted = statistics.median(plain_times), statistics.median(convert_times)
    rows = [
        ("plain load + save_pretrained", plain, max(plain_rss), 1.0),
        (f"mla-convert convert (MLA, latent {args.latent_dim})", converted, max(convert_rss), converted / plain),
    ]
    print()
    print(f"{'command':44s} {'median wall s':>13s} {'peak RSS GB':>12s} {'ratio':>6s}")
    for name, seconds, rss, ratio in rows:
        print(f"{name:44s} {seconds:13.1f} {rss:12.2f} {ratio:6.2f}")
    verdict = "meets" if converted / plain <= 1.3 else "MISSES"
    print(f"\nratio {converted / plain:.2f} {verdict} the target of <= 1.3 ({args.repeats} alternated runs)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "latent_dim": args.latent_dim,
                    "repeats": args.repeats,
                    "plain_seconds": plain_times,
                    "convert_seconds": convert_times,
                    "plain_peak_rss_gb": plain_rss,
                    "convert_peak_rss_gb": convert_rss,
                    "ratio": converted / plain,
                },
                indent=2,
            )
        )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
