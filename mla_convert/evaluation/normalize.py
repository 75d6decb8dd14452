"""Text normalisation before scoring, applied identically to references and hypotheses.

* CTC models were trained on LibriSpeech-style text: :func:`librispeech_normalize` (upper case,
  punctuation removed except apostrophes, spaces collapsed).
* Sequence-to-sequence models such as Whisper write cased, punctuated text with spelling variants:
  Whisper's own ``EnglishTextNormalizer`` (numbers, contractions, British/American spelling via
  the tokenizer's ``english_spelling_normalizer`` mapping when it has one).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

LIBRISPEECH = "librispeech"
WHISPER_ENGLISH = "whisper-english"

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_NOT_WORD = re.compile(r"[^\w']+|_")


def librispeech_normalize(text: str) -> str:
    """``"Hello, world -- it's 'me'!"`` -> ``"HELLO WORLD IT'S 'ME'"``: LibriSpeech reference style."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).upper()
    return " ".join(_NOT_WORD.sub(" ", text).split())


def whisper_english_normalizer(tokenizer=None) -> Callable[[str], str]:
    """Whisper's English normaliser with the tokenizer's spelling mapping (``{}`` when it has none)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = getattr(tokenizer, "english_spelling_normalizer", None) or {}
    normalizer = EnglishTextNormalizer(mapping)

    def normalize(text: str) -> str:
        return " ".join(normalizer(text).split())

    return normalize


def normalizer_for(kind: str, tokenizer=None) -> tuple[str, Callable[[str], str]]:
    """``(name, function)`` for a model kind: ``"ctc"``, ``"nar"`` (Paraformer) or ``"seq2seq"``."""
    if kind == "seq2seq":
        return WHISPER_ENGLISH, whisper_english_normalizer(tokenizer)
    return LIBRISPEECH, librispeech_normalize
