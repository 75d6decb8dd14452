"""Config of a Whisper model whose attention was converted by mla_convert."""

from __future__ import annotations

from transformers import WhisperConfig


class ConvertedWhisperConfig(WhisperConfig):
    """``WhisperConfig`` plus ``attention_conversion`` (converted module paths -> variant dicts,
    paths relative to the base model, e.g. ``"decoder.layers.2.self_attn"``).

    ``model_type`` stays ``"whisper"``: ``pipeline("automatic-speech-recognition")`` and other
    tools pick Whisper's own code paths (long-form chunking, timestamps, the processor) by it; the
    ``auto_map`` of a saved config selects these classes with ``trust_remote_code=True``.
    """

    model_type = "whisper"
    attention_conversion: dict | None = None


ConvertedWhisperConfig.register_for_auto_class()
