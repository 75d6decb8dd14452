"""wav2vec2-conformer with converted self-attention (MLA / GQA / linear), loadable as remote code.

Each class is the stock transformers class plus one step after ``__init__``: the self-attention
modules named in ``config.attention_conversion["layers"]`` are replaced by the variant that entry
describes. Weights then load as usual from safetensors.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Wav2Vec2ConformerForAudioFrameClassification,
    Wav2Vec2ConformerForCTC,
    Wav2Vec2ConformerForSequenceClassification,
    Wav2Vec2ConformerForXVector,
    Wav2Vec2ConformerModel,
)

from .attention_base import AttentionGeometry, ConvertedAttention, LayerSpec
from .attention_build import build_attention
from .configuration_converted_wav2vec2_conformer import ConvertedWav2Vec2ConformerConfig


def conformer_geometry(config) -> AttentionGeometry:
    """Every projection of ``Wav2Vec2ConformerSelfAttention`` has a bias except ``linear_pos``."""
    return AttentionGeometry(hidden_size=config.hidden_size, num_heads=config.num_attention_heads)


def conformer_position_mode(config) -> str:
    return config.position_embeddings_type or "none"


class ConvertedConformerSelfAttention(nn.Module):
    """Speaks the conformer layer's calling convention and delegates to the variant."""

    def __init__(self, config, layer_spec: LayerSpec | dict) -> None:
        super().__init__()
        self.attention: ConvertedAttention = build_attention(
            layer_spec,
            conformer_geometry(config),
            conformer_position_mode(config),
            config,
            dropout=config.attention_dropout,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        relative_position_embeddings: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.attention(
            hidden_states, attention_mask=attention_mask, position_embeddings=relative_position_embeddings, **kwargs
        )


def apply_attention_conversion(base_model: nn.Module, config) -> None:
    """Swap in the (unseeded) converted attention modules the config describes."""
    conversion = getattr(config, "attention_conversion", None) or {}
    for path, layer_spec in conversion.get("layers", {}).items():
        parent_path, _, name = path.rpartition(".")
        parent = base_model.get_submodule(parent_path)
        setattr(parent, name, ConvertedConformerSelfAttention(config, layer_spec))


class _ConvertedAttentionMixin:
    config_class = ConvertedWav2Vec2ConformerConfig
    _no_split_modules = ["Wav2Vec2ConformerEncoderLayer"]  # FSDP / device_map: one unit per layer

    def __init__(self, config) -> None:
        super().__init__(config)
        apply_attention_conversion(self.base_model, config)

    def get_input_embeddings(self) -> nn.Module:
        """The projection of the convolutional features into the encoder's width (wav2vec2 has no
        token embedding; accelerate's FSDP2 asks every model for one)."""
        return self.base_model.feature_projection


class ConvertedWav2Vec2ConformerModel(_ConvertedAttentionMixin, Wav2Vec2ConformerModel):
    pass


class ConvertedWav2Vec2ConformerForCTC(_ConvertedAttentionMixin, Wav2Vec2ConformerForCTC):
    pass


class ConvertedWav2Vec2ConformerForSequenceClassification(
    _ConvertedAttentionMixin, Wav2Vec2ConformerForSequenceClassification
):
    pass


class ConvertedWav2Vec2ConformerForAudioFrameClassification(
    _ConvertedAttentionMixin, Wav2Vec2ConformerForAudioFrameClassification
):
    pass


class ConvertedWav2Vec2ConformerForXVector(_ConvertedAttentionMixin, Wav2Vec2ConformerForXVector):
    pass


# original class -> (converted class, auto class it is registered for)
CONVERTED_CLASSES = {
    Wav2Vec2ConformerModel: (ConvertedWav2Vec2ConformerModel, "AutoModel"),
    Wav2Vec2ConformerForCTC: (ConvertedWav2Vec2ConformerForCTC, "AutoModelForCTC"),
    Wav2Vec2ConformerForSequenceClassification: (
        ConvertedWav2Vec2ConformerForSequenceClassification,
        "AutoModelForAudioClassification",
    ),
    Wav2Vec2ConformerForAudioFrameClassification: (
        ConvertedWav2Vec2ConformerForAudioFrameClassification,
        "AutoModelForAudioFrameClassification",
    ),
    Wav2Vec2ConformerForXVector: (ConvertedWav2Vec2ConformerForXVector, "AutoModelForAudioXVector"),
}

for _converted, _auto_class in CONVERTED_CLASSES.values():
    _converted.register_for_auto_class(_auto_class)
