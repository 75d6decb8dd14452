"""``mla-convert``: argument parsing only; the work is done by the package's functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

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
