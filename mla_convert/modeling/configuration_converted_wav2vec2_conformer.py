"""Config of a wav2vec2-conformer whose attention was converted by mla_convert."""

from __future__ import annotations

from transformers import Wav2Vec2ConformerConfig


class ConvertedWav2Vec2ConformerConfig(Wav2Vec2ConformerConfig):
    """``Wav2Vec2ConformerConfig`` plus ``attention_conversion``.

    ``attention_conversion["layers"]`` maps each converted module path (relative to the base
    model, e.g. ``"encoder.layers.3.self_attn"``) to the plain dict of its variant
    (``{"attention": "mla", "latent_dim": 256, ...}``); the rest records how it was made.
    """

    model_type = "mla_convert_wav2vec2_conformer"
    attention_conversion: dict | None = None


ConvertedWav2Vec2ConformerConfig.register_for_auto_class()
