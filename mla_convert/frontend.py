"""The processor of mla_convert's Conformer / Branchformer CTC models: features, tokens, CMVN.

A processor is a ``Wav2Vec2Processor`` of a
:class:`~mla_convert.modeling.feature_extraction_conformer.ConformerFeatureExtractor` (ESPnet's
log-mel front end, saved as remote code) and a ``Wav2Vec2CTCTokenizer`` whose id 0 is the CTC blank
(its ``pad_token``), so ``tokenizer.batch_decode(ids)`` of greedy CTC ids groups repeats and drops
blanks, and ``tokenizer(text).input_ids`` are CTC targets (a space becomes the word delimiter ``|``).

``vocab.json`` maps each token to its id, keyed by the text the id writes: ESPnet token lists keep
their ids and order, but their ``<space>`` is stored as ``|``, sentencepiece's ``▁`` as a space and
``<sos/eos>`` (never a CTC target) as the empty string, which decodes to nothing. (transformers 5
reloads a tokenizer's ``word_delimiter_token`` as ``|`` whatever was saved, and splits a
multi-character delimiter into letters when encoding, so ``|`` is the only delimiter that survives.)
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

from .modeling.feature_extraction_conformer import ConformerFeatureExtractor

BLANK = "<blank>"
UNKNOWN = "<unk>"
WORD_DELIMITER = "|"
LIBRISPEECH_CHARACTERS = ("'", *string.ascii_uppercase)
# ESPnet token-list symbols
ESPNET_SPACE = "<space>"
ESPNET_SOS_EOS = "<sos/eos>"
SENTENCEPIECE_SPACE = "\u2581"
VOCAB_FILE = "vocab.json"
# ESPnet collect_stats / GlobalMVN: the smallest variance kept
CMVN_VARIANCE_FLOOR = 1e-20


def char_vocabulary(texts: Iterable[str] = ()) -> list[str]:
    """``["<blank>", "<unk>", "|"]`` and, sorted, the LibriSpeech characters plus every other
    character of ``texts`` but the space."""
    characters = set(LIBRISPEECH_CHARACTERS)
    for text in texts:
        characters.update(text)
    characters.discard(" ")
    characters -= {BLANK, UNKNOWN, WORD_DELIMITER}
    return [BLANK, UNKNOWN, WORD_DELIMITER, *sorted(characters)]


def _ctc_tokenizer(
    vocabulary: Sequence[str],
    directory: str | os.PathLike | None,
    tokenizer_class: type[Wav2Vec2CTCTokenizer] = Wav2Vec2CTCTokenizer,
) -> Wav2Vec2CTCTokenizer:
    """A CTC tokenizer (or ``tokenizer_class``, a subclass) whose id ``i`` is ``vocabulary[i]``, its
    ``vocab.json`` written to ``directory`` (a temporary folder when ``None``: the tokenizer keeps
    the vocabulary in memory)."""
    if len(set(vocabulary)) != len(vocabulary):
        duplicates = sorted({token for token in vocabulary if vocabulary.count(token) > 1})
        raise ValueError(f"the token list repeats {duplicates}")
    if not vocabulary or vocabulary[0] != BLANK:
        raise ValueError(f"the first token (id 0, the CTC blank) must be {BLANK!r}")
    if UNKNOWN not in vocabulary:
        raise ValueError(f"the token list has no {UNKNOWN!r}")
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="mla_convert-vocab-") as temporary:
            return _ctc_tokenizer(vocabulary, temporary, tokenizer_class)
    path = Path(directory) / VOCAB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(vocabulary)}
    path.write_text(json.dumps(vocab, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer_class(
        str(path),
        bos_token=None,
        eos_token=None,
        unk_token=UNKNOWN,
        pad_token=BLANK,
        word_delimiter_token=WORD_DELIMITER,
    )


def char_tokenizer(
    tokens: Sequence[str],
    directory: str | os.PathLike | None = None,
    tokenizer_class: type[Wav2Vec2CTCTokenizer] = Wav2Vec2CTCTokenizer,
) -> Wav2Vec2CTCTokenizer:
    """The CTC tokenizer of a character vocabulary (see :func:`char_vocabulary`): id ``i`` is
    ``tokens[i]``, ``<blank>`` (id 0) the pad token, ``|`` the word delimiter. A Paraformer's
    ``ParaformerTokenizer`` (``tokenizer_class``) is the same but keeps repeated tokens."""
    tokens = list(tokens)
    if WORD_DELIMITER not in tokens:
        raise ValueError(f"a character vocabulary needs the word delimiter {WORD_DELIMITER!r}")
    return _ctc_tokenizer(tokens, directory, tokenizer_class)


def espnet_vocabulary(token_list: Sequence[str]) -> list[str]:
    """ESPnet's ``token_list`` (``<blank>``, ``<unk>``, characters or sentencepiece pieces,
    ``<sos/eos>``), each token as the text it writes: ``<space>`` -> ``|``, ``▁`` -> a space
    (a lone ``▁`` -> ``|``), ``<sos/eos>`` -> ``""``. The ids are unchanged."""
    if WORD_DELIMITER in token_list:
        raise ValueError(f"the token list has {WORD_DELIMITER!r}, the word delimiter of the converted vocabulary")
    vocabulary = []
    for token in token_list:
        if token in (ESPNET_SPACE, SENTENCEPIECE_SPACE):
            vocabulary.append(WORD_DELIMITER)
        elif token == ESPNET_SOS_EOS:
            vocabulary.append("")
        elif token in (BLANK, UNKNOWN):
            vocabulary.append(token)
        else:
            vocabulary.append(token.replace(SENTENCEPIECE_SPACE, " "))
    return vocabulary


def tokenizer_from_token_list(
    token_list: Sequence[str],
    directory: str | os.PathLike | None = None,
    tokenizer_class: type[Wav2Vec2CTCTokenizer] = Wav2Vec2CTCTokenizer,
) -> Wav2Vec2CTCTokenizer:
    """The CTC tokenizer of an ESPnet model's ``token_list``: the same ids in the same order;
    ``<space>`` is the word delimiter, sentencepiece's ``▁`` decodes to a space and ``<sos/eos>``
    to nothing (see :func:`espnet_vocabulary`)."""
    return _ctc_tokenizer(espnet_vocabulary(list(token_list)), directory, tokenizer_class)


def cmvn_statistics(
    audios: Iterable[np.ndarray], extractor: ConformerFeatureExtractor
) -> tuple[list[float], list[float]]:
    """Global mean and standard deviation of ``extractor``'s un-normalised log-mel features over
    every frame of ``audios`` (ESPnet's ``collect_stats``: sum, sum of squares and frame count in
    float64; ``std = sqrt(max(var, 1e-20))``)."""
    total = np.zeros(extractor.feature_size, dtype=np.float64)
    total_squares = np.zeros(extractor.feature_size, dtype=np.float64)
    count = 0
    for audio in audios:
        features = extractor.log_mel_spectrogram(audio)
        total += features.sum(axis=0)
        total_squares += (features**2).sum(axis=0)
        count += features.shape[0]
    if count == 0:
        raise ValueError("no audio to compute CMVN statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_squares / count - mean**2, CMVN_VARIANCE_FLOOR))
    return mean.tolist(), std.tolist()


def build_processor(
    tokens: Sequence[str],
    cmvn_mean: Sequence[float] | None = None,
    cmvn_std: Sequence[float] | None = None,
    *,
    espnet_token_list: bool = False,
    directory: str | os.PathLike | None = None,
    tokenizer_class: type[Wav2Vec2CTCTokenizer] = Wav2Vec2CTCTokenizer,
    **extractor_kwargs: Any,
) -> Wav2Vec2Processor:
    """A ``Wav2Vec2Processor`` of a :class:`ConformerFeatureExtractor` (``extractor_kwargs``, with
    the CMVN statistics) and the CTC tokenizer of ``tokens``: a character vocabulary
    (:func:`char_tokenizer`) or, with ``espnet_token_list=True``, an ESPnet model's token list
    (:func:`tokenizer_from_token_list`). ``directory`` receives ``vocab.json`` (default: a
    temporary folder); ``tokenizer_class`` is the tokenizer's class (a Paraformer's
    ``ParaformerTokenizer``); ``processor.save_pretrained`` writes every file."""
    extractor = ConformerFeatureExtractor(
        cmvn_mean=None if cmvn_mean is None else list(cmvn_mean),
        cmvn_std=None if cmvn_std is None else list(cmvn_std),
        **extractor_kwargs,
    )
    make_tokenizer = tokenizer_from_token_list if espnet_token_list else char_tokenizer
    tokenizer = make_tokenizer(tokens, directory, tokenizer_class)
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
