"""Benchmark ``mla-convert evaluate`` against a plain loop over ``transformers.pipeline``.

Same model, same utterances, same greedy decoding, same text normaliser and scoring:

(a) what a typical user writes: ``pipeline("automatic-speech-recognition", model=...)`` called once per
    utterance (on the file path when FFmpeg is installed, else on the array read with soundfile);
(b) ``mla-convert evaluate`` (its ``main()``, in this process): streamed decoding in a background
    thread, length-sorted batches, ``inference_mode``.

Both timings include loading the model; the imports both need are done before either timing, so
neither pays Python's first-import cost. The target is (b) >= 3x faster than (a) at identical WER.
The script also times the part no evaluator can skip, in the same precision: the encoder
(seq2seq) or the whole forward pass (CTC), one utterance at a time, and prints the speed-up that
bound allows: (a)'s time over the floor's.

    python scripts/bench_evaluate.py                       # bundled:whisper-tiny.en on test-clean
    python scripts/bench_evaluate.py --model DIR --split dev-clean --limit 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_LIBRISPEECH = REPO.parent / "shared" / "data" / "LibriSpeech"


def default_model() -> str | None:
    try:
        import mla_convert.importers.ct2  # noqa: F401
    except ImportError:
        return None
    return "bundled:whisper-tiny.en"


def default_data() -> str:
    return os.environ.get("LIBRISPEECH_ROOT") or str(SHARED_LIBRISPEECH)


def pipeline_loop(
    model_id: str, path: str, kind: str, utterances: list[dict], device: str, greedy: bool = True
) -> tuple[list[str], float]:
    """(a): one pipeline call per utterance, as in the transformers docs."""
    import soundfile
    from transformers import pipeline

    start = time.perf_counter()
    kwargs = {"trust_remote_code": True} if _is_converted(path) else {}
    asr = pipeline("automatic-speech-recognition", model=path, device=device, **kwargs)
    # evaluate decodes greedily; the pipeline's own default for generate() is a 5-beam search
    call = {"generate_kwargs": {"num_beams": 1, "do_sample": False}} if kind == "seq2seq" and greedy else {}
    use_paths = shutil.which("ffmpeg") is not None
    texts = []
    for utterance in utterances:
        if use_paths:
            item = utterance["audio"]["path"]
        else:
            array, rate = soundfile.read(utterance["audio"]["path"], dtype="float32")
            item = {"raw": array, "sampling_rate": rate}
        texts.append(asr(item, **call)["text"])
    return texts, time.perf_counter() - start


def _is_converted(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text()).get("attention_conversion"))


def warm_imports(kind: str) -> None:
    """Import what (a) and (b) both use, so the first timing does not pay for it alone."""
    import datasets  # noqa: F401
    import transformers.pipelines  # noqa: F401
    from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq

    import mla_convert.evaluation  # noqa: F401

    auto = AutoModelForCTC if kind == "ctc" else AutoModelForSpeechSeq2Seq
    auto._model_mapping  # noqa: B018 - resolves the lazy mapping (imports the model modules)


def forward_floor(path: str, kind: str, utterances: list[dict], device: str) -> float:
    """Seconds of the work every evaluator must do: the encoder of a seq2seq model, or a CTC
    model's whole forward pass, in float32, one utterance at a time (the fastest on a CPU)."""
    import soundfile
    import torch
    from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq, AutoProcessor

    kwargs = {"trust_remote_code": True} if _is_converted(path) else {}
    auto = AutoModelForCTC if kind == "ctc" else AutoModelForSpeechSeq2Seq
    model = auto.from_pretrained(path, **kwargs).to(device).eval()
    extractor = AutoProcessor.from_pretrained(path, **kwargs).feature_extractor
    run = model if kind == "ctc" else model.get_encoder()
    inputs = []
    for utterance in utterances:
        array, rate = soundfile.read(utterance["audio"]["path"], dtype="float32")
        features = extractor(array, sampling_rate=rate, return_tensors="pt")
        inputs.append(features[model.main_input_name].to(device))
    with torch.inference_mode():
        run(inputs[0])  # warm-up: not timed
        start = time.perf_counter()
        for item in inputs:
            run(item)
        return time.perf_counter() - start


def evaluate_cli(model_id: str, args: argparse.Namespace, output: Path) -> tuple[dict, float]:
    """(b): the CLI entry point, in this process."""
    from mla_convert.cli import main

    argv = ["evaluate", model_id, "--split", args.split, "--data", args.data, "--output", str(output), "--quiet"]
    argv += ["--batch-size", str(args.batch_size), "--device", args.device]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    start = time.perf_counter()
    status = main(argv)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"mla-convert evaluate failed with status {status}")
    return json.loads(output.read_text()), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model(), help="default bundled:whisper-tiny.en (needs ct2)")
    parser.add_argument("--data", default=default_data(), help="LibriSpeech root (default $LIBRISPEECH_ROOT or shared)")
    parser.add_argument("--split", default="test-clean")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument(
        "--default-pipeline",
        action="store_true",
        help="also time the pipeline with its own default decoding (5-beam search for seq2seq: a different WER)",
    )
    args = parser.parse_args()
    if not args.model:
        parser.error("mla_convert.importers.ct2 is not available: pass --model PATH")

    import jiwer
    import torch
    from transformers import AutoProcessor

    from mla_convert.data import iter_local_index, resolve_source
    from mla_convert.evaluation import asr_kind, normalizer_for
    from mla_convert.loading import load_config

    root = resolve_source(args.data)
    if root == "hub":
        parser.error("the benchmark reads local files: pass --data PATH")
    utterances = list(iter_local_index(root, args.split))[: args.limit or None]
    audio_path = args.model
    if args.model.startswith("bundled:"):
        from mla_convert.importers.bundled import resolve_bundled

        audio_path = resolve_bundled(args.model)  # imported once, before either timing
    kind = asr_kind(load_config(audio_path), args.model)
    processor = AutoProcessor.from_pretrained(audio_path)
    _, normalize = normalizer_for(kind, getattr(processor, "tokenizer", processor))  # as evaluate normalises
    print(f"model {args.model} ({kind}), {len(utterances)} utterances of {args.split}, torch threads "
          f"{torch.get_num_threads()}, ffmpeg {'yes' if shutil.which('ffmpeg') else 'no (arrays)'}")  # fmt: skip

    warm_imports(kind)
    with tempfile.TemporaryDirectory() as scratch:
        payload, evaluate_seconds = evaluate_cli(args.model, args, Path(scratch) / "bench.json")
        lines = [json.loads(line) for line in (Path(scratch) / "bench.jsonl").read_text().splitlines()]
    scored = {r["id"]: r for r in lines if r.get("type") == "utterance"}
    result = payload["results"][0]

    texts, pipeline_seconds = pipeline_loop(args.model, audio_path, kind, utterances, args.device)
    references = [normalize(u["text"]) for u in utterances]
    hypotheses = [normalize(text) for text in texts]
    pipeline_wer = jiwer.wer(references, hypotheses)
    differing = sum(scored[u["id"]]["hypothesis"] != hyp for u, hyp in zip(utterances, hypotheses, strict=True))

    floor_seconds = forward_floor(audio_path, kind, utterances, args.device)
    ratio = pipeline_seconds / evaluate_seconds
    rows = [
        ("method", "wall s", "utterances", "WER", "speed-up"),
        ("(a) pipeline loop", f"{pipeline_seconds:.1f}", str(len(utterances)), f"{100 * pipeline_wer:.2f}%", "1.00x"),
        (
            "(b) mla-convert evaluate",
            f"{evaluate_seconds:.1f}",
            str(result["utterances"]),
            f"{100 * result['wer']:.2f}%",
            f"{ratio:.2f}x",
        ),
    ]
    default_numbers = {}
    if args.default_pipeline and kind == "seq2seq":
        texts, seconds = pipeline_loop(args.model, audio_path, kind, utterances, args.device, greedy=False)
        wer = jiwer.wer(references, [normalize(text) for text in texts])
        default_numbers = {"default_pipeline_seconds": seconds, "default_pipeline_wer": wer}
        label = "(a') pipeline, default beams"
        rows.insert(
            2,
            (label, f"{seconds:.1f}", str(len(utterances)), f"{100 * wer:.2f}%", f"{pipeline_seconds / seconds:.2f}x"),
        )
        rows[-1] = (*rows[-1][:4], f"{ratio:.2f}x ({seconds / evaluate_seconds:.2f}x vs a')")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    same = abs(pipeline_wer - result["wer"]) < 1e-12
    print(f"WER identical: {'yes' if same else 'no'}; transcripts that differ: {differing}/{len(utterances)}")
    floor_part = "encoder" if kind == "seq2seq" else "forward pass"
    bound = pipeline_seconds / floor_seconds
    print(f"floor: the float32 {floor_part} alone, one utterance at a time, takes {floor_seconds:.1f} s "
          f"({100 * floor_seconds / pipeline_seconds:.0f}% of (a)): no evaluator that runs it can be more "
          f"than {bound:.2f}x faster than (a) at this precision")  # fmt: skip
    target = "met" if ratio >= 3 else "NOT met"
    print(f"evaluate: audio {result['audio_seconds']:.1f} s, RTF {result['real_time_factor']:.3f}, "
          f"generation-limit hits {result['generation_limit_hits']}; target >= 3x: {target}")  # fmt: skip
    if args.json:
        numbers = {
            "model": args.model,
            "split": args.split,
            "utterances": len(utterances),
            "pipeline_seconds": pipeline_seconds,
            "evaluate_seconds": evaluate_seconds,
            "speedup": ratio,
            "pipeline_wer": pipeline_wer,
            "evaluate_wer": result["wer"],
            "differing_transcripts": differing,
            "floor_seconds": floor_seconds,
            "floor_bound": bound,
            **default_numbers,
        }
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
