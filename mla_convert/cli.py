"""``mla-convert``: argument parsing only; the work is done by the package's functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import MlaConvertError
from .specs import GQASpec, LinearSpec, MLASpec


def _spec_from_args(args: argparse.Namespace):
    if args.attention == "mla":
        if args.latent_dim is None:
            raise MlaConvertError("--attention mla needs --latent-dim N")
        return MLASpec(latent_dim=args.latent_dim, init=args.init or "svd")
    if args.attention == "gqa":
        if args.kv_heads is None:
            raise MlaConvertError("--attention gqa needs --kv-heads N")
        return GQASpec(kv_heads=args.kv_heads)
    return LinearSpec(feature_map=args.feature_map)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint

    spec = _spec_from_args(args)
    report = convert_checkpoint(
        args.model,
        spec,
        args.output,
        overwrite=args.overwrite,
        layers=args.layers,
        targets=args.targets,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
        print(f"saved to {args.output} (conversion_report.json inside)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_models, format_results

    try:
        payload, output = evaluate_models(
            args.models,
            args.split,
            data=args.data,
            batch_size=args.batch_size,
            limit=args.limit,
            device=args.device,
            fp16=args.fp16,
            output=args.output,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print("mla-convert: interrupted; run the same command again to resume from the .jsonl journal", file=sys.stderr)
        return 130
    print(format_results(payload))
    print(f"wrote {output} (per-utterance lines in {output.with_suffix('.jsonl')})")
    return 0


def _cmd_import_ct2(args: argparse.Namespace) -> int:
    from .ct2 import import_ct2

    output = import_ct2(args.path, args.output, overwrite=args.overwrite)
    print(f"wrote a transformers Whisper model + processor to {output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_NOTES, mla_variants, run_variants, write_report

    rows, journal = run_variants(
        mla_variants(args.latent_dims),
        data=args.data,
        splits=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        checkpoints_dir=args.checkpoints_dir,
        results_dir=args.output_dir / "demo_runs",
        progress=not args.quiet,
    )
    paths = write_report(rows, args.split, args.output_dir, "demo", "mla-convert demo: Whisper tiny.en", DEMO_NOTES)
    print(paths[0].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)} (per-utterance journal: {journal.with_suffix('.jsonl')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mla-convert",
        description="Convert the attention of trained HF speech models to MLA, GQA or linear attention.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a model's attention and save it as an HF model")
    convert.add_argument("model", help="Hub id or local directory of the model to convert")
    convert.add_argument("--attention", choices=("mla", "gqa", "linear"), required=True)
    convert.add_argument("--latent-dim", type=int, help="MLA: K/V latent width per token")
    convert.add_argument("--init", choices=("svd", "svd-split"), help="MLA seeding (default svd: joint K/V SVD)")
    convert.add_argument("--kv-heads", type=int, help="GQA: number of key/value heads")
    convert.add_argument("--feature-map", default="elu", choices=("elu", "relu"), help="linear attention kernel")
    convert.add_argument("--layers", type=int, nargs="+", help="only these layer indices (default: all)")
    convert.add_argument("--targets", nargs="+", help="attention roles to convert where a model has several")
    convert.add_argument("--output", required=True, help="directory to write the converted model to")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    convert.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(handler=_cmd_convert)

    evaluate = sub.add_parser("evaluate", help="WER/CER of speech recognition models on LibriSpeech")
    evaluate.add_argument("models", nargs="+", metavar="MODEL", help="Hub ids, local directories or bundled: ids")
    evaluate.add_argument("--split", nargs="+", default=["test-clean", "test-other"], help="LibriSpeech subsets")
    evaluate.add_argument("--data", help="hub, or an extracted LibriSpeech root (default: $LIBRISPEECH_ROOT, else hub)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="utterances per batch (default 16)")
    evaluate.add_argument("--limit", type=int, help="only the first N utterances of each split")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    evaluate.add_argument("--fp16", action="store_true", help="run the model in float16")
    evaluate.add_argument("--output", help="result JSON (default results/eval-<timestamp>.json); .jsonl beside it")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_cmd_evaluate)

    importer = sub.add_parser("import-ct2", help="import a CTranslate2 Whisper model (faster-whisper format)")
    importer.add_argument("path", help="CTranslate2 model directory (model.bin, config.json, tokenizer.json)")
    importer.add_argument("--output", required=True, help="directory to write the transformers model to")
    importer.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    importer.set_defaults(handler=_cmd_import_ct2)

    demo = sub.add_parser("demo", help="convert the bundled Whisper tiny.en to MLA and compare WER and cache size")
    demo.add_argument("--data", help="hub, or an extracted LibriSpeech root (default: $LIBRISPEECH_ROOT, else hub)")
    demo.add_argument("--split", nargs="+", default=["test-clean", "test-other"], help="LibriSpeech subsets")
    demo.add_argument("--latent-dims", type=int, nargs="+", default=[384, 192, 96, 48], help="MLA latent sizes")
    demo.add_argument("--limit", type=int, help="only the first N utterances of each split")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--output-dir", type=Path, default=Path("results"), help="where the table and plot go")
    demo.add_argument("--checkpoints-dir", type=Path, default=Path("checkpoints/demo"))
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except MlaConvertError as error:
        print(f"mla-convert: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mla-convert: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
