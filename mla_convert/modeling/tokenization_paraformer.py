"""The tokenizer of mla_convert's Paraformer: the Conformer models' character tokenizer, without
CTC's merging of repeats.

A Paraformer's decoder writes one token per row (``hello`` is ``h e l l o``), so ``decode`` must
keep a token that repeats the one before it; a CTC tokenizer merges them. Everything else (the
vocabulary, ``<blank>`` as id 0 that decodes to nothing, ``|`` as the word delimiter) is
``Wav2Vec2CTCTokenizer``'s, so the same ``vocab.json`` serves both. This file is remote code.
"""

from __future__ import annotations

from transformers import Wav2Vec2CTCTokenizer


class ParaformerTokenizer(Wav2Vec2CTCTokenizer):
    """``Wav2Vec2CTCTokenizer`` whose ``decode`` / ``batch_decode`` keep repeated tokens
    (``group_tokens=False`` unless asked otherwise); blanks (padding rows) are still dropped."""

    def _decode(self, token_ids: list[int], *args, group_tokens: bool = False, **kwargs) -> str:
        return super()._decode(token_ids, *args, group_tokens=group_tokens, **kwargs)


ParaformerTokenizer.register_for_auto_class("AutoTokenizer")
