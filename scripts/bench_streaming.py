"""Streaming benchmark: attention-cache bytes, per-chunk latency and real-time factor of one
streaming Conformer with MHA and with its MLA / GQA / linear conversions, side by side in one run.

A streaming MHA Conformer (causal convolutions, chunk masks; seeded random weights, the shapes
of ``configs/conformer_mha_streaming.yaml`` at ``--hidden`` / ``--layers``) is converted after
"training" to MLA (``--latent-dim``), GQA (``--kv-heads``) and linear (elu) attention with
``mla_convert.convert``. Each model streams the same real LibriSpeech audio (dev-clean utterances
concatenated) in ``--piece-ms`` pieces, with the left context capped (``--left-chunks``) and
uncapped. After every piece the attention cache is measured from the live tensors
(``StreamingState.attention_bytes``) and compared with the formula (the variants' own
``state_values`` / ``fixed_values``); the table reports the bytes after the last piece, per-chunk
latency (median, p95 of the feeds that completed chunks, per chunk) and the real-time factor.
Variants run interleaved, ``--repeats`` times, on one thread; nothing else should run meanwhile.

    python scripts/bench_streaming.py [--seconds 60] [--chunk-size 16] [--left-chunks 4]

Prints the table; writes ``results/bench_streaming.json`` and ``results/bench_streaming.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def audio_of(root: Path, seconds: float) -> tuple[np.ndarray, list[str]]:
    from mla_convert.data.audio import decode_audio

    pieces, names, total = [], [], 0
    for path in sorted((root / "dev-clean").rglob("*.flac")):
        pieces.append(decode_audio(path))
        names.append(path.stem)
        total += pieces[-1].shape[0]
        if total >= seconds * 16000:
            break
    audio = np.concatenate(pieces)[: int(seconds * 16000)]
    return audio, names


def build_models(args) -> dict:
    import mla_convert
    from mla_convert.modeling.configuration_conformer import ConformerConfig
    from mla_convert.modeling.modeling_conformer import ConformerForCTC
    from mla_convert.specs import GQASpec, LinearSpec, MLASpec

    torch.manual_seed(0)
    config = ConformerConfig(
        vocab_size=30, hidden_size=args.hidden, num_attention_heads=args.heads, num_hidden_layers=args.layers,
        intermediate_size=4 * args.hidden, conv_kernel_size=15, chunk_size=args.chunk_size,
        num_left_chunks=-1, causal_conv=True,
    )  # fmt: skip
    mha = ConformerForCTC(config).eval()
    models = {"mha": mha}
    for name, spec in (
        (f"gqa kv{args.kv_heads}", GQASpec(kv_heads=args.kv_heads)),
        (f"mla d_c{args.latent_dim}", MLASpec(latent_dim=args.latent_dim)),
        ("linear elu", LinearSpec(feature_map="elu")),
    ):
        converted = copy.deepcopy(mha)
        mla_convert.convert(converted, spec)
        models[name] = converted.eval()
    return models


def stream_once(model, processor, audio: np.ndarray, piece: int, chunk_size: int, left: int) -> dict:
    from mla_convert.modeling.streaming_speech_encoder import attention_cache_values

    model.config.num_left_chunks = left  # the chunking it "was trained with" (random weights: any)
    session = model.stream(processor, chunk_size=chunk_size, num_left_chunks=left)
    left_chunks = None if left < 0 else left
    latencies, compute, formula_ok = [], 0.0, True
    for start in range(0, audio.shape[0], piece):
        before = session.state.frames
        began = time.perf_counter()
        session.feed(audio[start : start + piece])
        spent = time.perf_counter() - began
        compute += spent
        chunks = (session.state.frames - before) // chunk_size
        if chunks:
            latencies.append(spent / chunks)
        formula = 4 * attention_cache_values(model, session.state.frames, chunk_size, left_chunks)
        formula_ok &= session.state.attention_bytes() == formula
    frames = session.state.frames
    measured = session.state.attention_bytes()
    formula = 4 * attention_cache_values(model, frames, chunk_size, left_chunks)
    began = time.perf_counter()
    session.finish()
    compute += time.perf_counter() - began
    return {
        "frames": frames, "attention_bytes": measured, "formula_bytes": formula,
        "formula_equal_after_every_piece": bool(formula_ok), "conv_bytes": session.state.conv_bytes(),
        "latencies": latencies, "compute_s": compute,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=os.environ.get("LIBRISPEECH_ROOT", str(ROOT.parent / "shared/data/LibriSpeech"))
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--left-chunks", type=int, default=4)
    parser.add_argument("--piece-ms", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "results" / "bench_streaming.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from mla_convert.frontend import build_processor, char_vocabulary

    audio, names = audio_of(Path(args.data), args.seconds)
    processor = build_processor(char_vocabulary([]), [-6.0] * 80, [3.0] * 80, win_length=400, hop_length=160)
    models = build_models(args)
    piece = args.piece_ms * 16
    settings = [args.left_chunks, -1]
    runs: dict = {(name, left): [] for name in models for left in settings}
    for _ in range(args.repeats):  # interleaved: every variant sees the same machine state
        for left in settings:
            for name, model in models.items():
                runs[(name, left)].append(stream_once(model, processor, audio, piece, args.chunk_size, left))

    duration = audio.shape[0] / 16000
    rows = []
    for (name, left), results in runs.items():
        latencies = np.concatenate([result["latencies"] for result in results]) * 1000
        last = results[-1]
        rows.append({
            "variant": name, "num_left_chunks": left, "frames": last["frames"],
            "attention_bytes": last["attention_bytes"], "formula_bytes": last["formula_bytes"],
            "equal_after_every_piece": all(result["formula_equal_after_every_piece"] for result in results),
            "conv_bytes": last["conv_bytes"],
            "chunk_latency_ms_median": float(np.median(latencies)),
            "chunk_latency_ms_p95": float(np.percentile(latencies, 95)),
            "rtf": float(np.median([result["compute_s"] for result in results]) / duration),
        })  # fmt: skip
    mha_bytes = {row["num_left_chunks"]: row["attention_bytes"] for row in rows if row["variant"] == "mha"}
    header = (
        f"{'variant':12s} {'left':>5s} {'frames':>6s} {'attn cache B':>13s} {'formula B':>10s} {'= formula':>9s} "
        f"{'vs MHA':>7s} {'conv B':>8s} {'chunk ms p50':>12s} {'p95':>7s} {'RTF':>6s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        share = row["attention_bytes"] / mha_bytes[row["num_left_chunks"]]
        row["vs_mha"] = share
        lines.append(
            f"{row['variant']:12s} {row['num_left_chunks']:>5d} {row['frames']:>6d} {row['attention_bytes']:>13,d} "
            f"{row['formula_bytes']:>10,d} {'yes' if row['equal_after_every_piece'] else 'NO':>9s} {share:>7.1%} "
            f"{row['conv_bytes']:>8,d} {row['chunk_latency_ms_median']:>12.2f} {row['chunk_latency_ms_p95']:>7.2f} "
            f"{row['rtf']:>6.3f}"
        )
    print("\n".join(lines))
    report = {
        "audio_seconds": duration, "utterances": names, "piece_ms": args.piece_ms, "chunk_size": args.chunk_size,
        "chunk_ms": args.chunk_size * 40, "hidden": args.hidden, "heads": args.heads, "layers": args.layers,
        "threads": 1, "repeats": args.repeats, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "rows": rows,
    }  # fmt: skip
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    markdown = [
        "# Streaming benchmark (`scripts/bench_streaming.py`)",
        "",
        f"A streaming Conformer ({args.layers} layers, hidden {args.hidden}, {args.heads} heads, causal convolutions, "
        f"chunks of {args.chunk_size} encoder frames = {args.chunk_size * 40} ms; seeded random weights) and its "
        f"conversions, streaming {duration:.0f} s of dev-clean audio in {args.piece_ms} ms pieces on one CPU thread "
        f"({report['machine']}, torch {torch.__version__}); {args.repeats} interleaved repeats. Attention-cache bytes "
        "are the live tensors after the last piece; `= formula` checks them against the variant's formula after "
        "every piece. Latency is per chunk (the feeds that completed chunks); RTF is compute time / audio time.",
        "",
        "```",
        *lines,
        "```",
        "",
    ]
    Path(args.output).with_suffix(".md").write_text("\n".join(markdown), encoding="utf-8")
    print(f"wrote {args.output} and {Path(args.output).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
