"""Config of a Whisper model whose attention was converted by mla_convert."""

from __future__ import annotations

from transformers import WhisperConfig


class ConvertedWhisperConfig(WhisperConfig):
    """``WhisperConfig`` plus ``attention_conversion`` (converted module paths -> variant dicts,
    paths relative to the base model, e.g. ``"decoder.layers.2.self_attn"``)."""

    model_type = "mla_convert_whisper"
    attention_conversion: dict | None = None


ConvertedWhisperConfig.register_for_auto_class()
