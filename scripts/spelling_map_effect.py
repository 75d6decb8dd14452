"""How much Whisper's English spelling map (``normalizer.json``) moves the WER of an evaluation.

Reads an ``mla-convert evaluate`` journal (``NAME.jsonl``: raw transcripts per utterance) and the
LibriSpeech root it scored, normalises references and transcripts with Whisper's
``EnglishTextNormalizer`` twice (with the spelling map shipped in ``normalizer.json``, and with an
empty map, as evaluations before the map was shipped did), and prints both WERs per model and split.

    python scripts/spelling_map_effect.py results/NAME.jsonl --data $LIBRISPEECH_ROOT
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import jiwer
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from mla_convert.data import iter_local_index
from mla_convert.importers.ct2 import english_spelling_map_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("journal", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the LibriSpeech root the journal scored")
    args = parser.parse_args()
    mapping = json.loads(english_spelling_map_file().read_text(encoding="utf-8"))
    with_map, without_map = EnglishTextNormalizer(mapping), EnglishTextNormalizer({})
    records = [json.loads(line) for line in args.journal.read_text(encoding="utf-8").splitlines() if line.strip()]
    utterances = [r for r in records if r.get("type") == "utterance" and "transcript" in r]
    references = {
        row["id"]: row["text"]
        for split in {r["split"] for r in utterances}
        for row in iter_local_index(args.data, split)
    }
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in utterances:
        groups[(record["model"], record["split"])].append(record)
    print("| model | split | WER % with map | WER % without map | utterances changed |")
    print("|---|---|---|---|---|")
    for (model, split), rows in sorted(groups.items()):
        errors = {}
        for name, normalise in (("with", with_map), ("without", without_map)):
            pairs = [(clean(normalise, references[r["id"]]), clean(normalise, r["transcript"])) for r in rows]
            errors[name] = [word_errors(ref, hyp) for ref, hyp in pairs]
            errors[name + " words"] = sum(len(ref.split()) for ref, _ in pairs)
        rates = [100 * sum(errors[n]) / max(1, errors[n + " words"]) for n in ("with", "without")]
        changed = sum(a != b for a, b in zip(errors["with"], errors["without"], strict=True))
        print(f"| {Path(model).name} | {split} | {rates[0]:.2f} | {rates[1]:.2f} | {changed}/{len(rows)} |")


def clean(normalise: EnglishTextNormalizer, text: str) -> str:
    return " ".join(normalise(text).split())


def word_errors(reference: str, hypothesis: str) -> int:
    if not reference:
        return len(hypothesis.split())
    words = jiwer.process_words(reference, hypothesis)
    return words.substitutions + words.deletions + words.insertions


if __name__ == "__main__":
    main()
