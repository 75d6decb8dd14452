#!/usr/bin/env python
"""Write a random-weight wav2vec2-conformer (relative positions) with processor files to DIR.

Used by the README's offline first run: the Hub cannot always be reached, and this model has
the layout of ``facebook/wav2vec2-conformer-rel-pos-large`` at a smaller size (hidden 512,
8 heads, 12 layers), so ``mla-convert convert`` can be tried on it in seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

LETTERS = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import (
        Wav2Vec2ConformerConfig,
        Wav2Vec2ConformerForCTC,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Processor,
    )

    torch.manual_seed(0)
    config = Wav2Vec2ConformerConfig(
        vocab_size=len(LETTERS),
        hidden_size=512,
        num_hidden_layers=12,
        num_attention_heads=8,
        intermediate_size=2048,
        position_embeddings_type="relative",
        conv_depthwise_kernel_size=31,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        pad_token_id=0,
    )
    Wav2Vec2ConformerForCTC(config).save_pretrained(args.output)
    with tempfile.TemporaryDirectory() as scratch:
        vocab = Path(scratch) / "vocab.json"
        vocab.write_text(json.dumps({token: index for index, token in enumerate(LETTERS)}))
        processor = Wav2Vec2Processor(
            feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True),
            tokenizer=Wav2Vec2CTCTokenizer(str(vocab)),
        )
        processor.save_pretrained(args.output)
    print(f"wrote a random-weight wav2vec2-conformer to {args.output}")


if __name__ == "__main__":
    main()
