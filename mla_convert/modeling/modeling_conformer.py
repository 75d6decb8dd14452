"""Conformer CTC model (ESPnet2 ``ConformerEncoder`` layout) with any attention variant.

A layer is ESPnet's ``EncoderLayer`` with ``normalize_before``: an optional macaron half-step
feed-forward, self-attention (built by ``build_attention`` from the config: MHA, MLA, GQA or
linear), the convolution module, the second feed-forward, and a final LayerNorm. Parameter
names follow ESPnet (``feed_forward_macaron.w_1``, ``conv_module.depthwise_conv``,
``norm_mha`` ...); the attention is the conversion core's (``q_proj``, ``k_proj`` ...).
Padded frames are zeroed before the depthwise convolution (ESPnet does not), so an utterance
gets the same logits alone and in a padded batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_conformer import ConformerConfig
from .modeling_speech_encoder import (
    ACTIVATIONS,
    FeedForward,
    SpeechEncoderForCTC,
    SpeechEncoderModel,
    StreamContext,
    conv_padding,
    depthwise_conv,
    run_attention,
    self_attention,
    zero_padding,
)


class ConformerConvolution(nn.Module):
    """ESPnet ``ConvolutionModule``: pointwise conv + GLU, depthwise conv, BatchNorm, activation,
    pointwise conv. With ``causal_conv`` the depthwise convolution sees only the past."""

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        channels, kernel = config.hidden_size, config.conv_kernel_size
        self.causal = config.causal_conv
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        padding = conv_padding(kernel, self.causal)
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel, padding=padding, groups=channels)
        self.norm = nn.BatchNorm1d(channels)
        self.activation = ACTIVATIONS[config.hidden_act]()
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)

    def forward(
        self, states: torch.Tensor, frame_mask: torch.Tensor | None, stream: StreamContext | None = None
    ) -> torch.Tensor:
        states = nn.functional.glu(self.pointwise_conv1(states.transpose(1, 2)), dim=1)
        states = zero_padding(states.transpose(1, 2), frame_mask).transpose(1, 2)
        states = self.activation(self.norm(depthwise_conv(self.depthwise_conv, states, self.causal, stream)))
        return self.pointwise_conv2(states).transpose(1, 2)


class ConformerLayer(nn.Module):
    def __init__(self, config: ConformerConfig, index: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps

        def feed_forward() -> FeedForward:
            return FeedForward(hidden, config.intermediate_size, config.hidden_act, config.dropout)

        self.feed_forward_macaron = feed_forward() if config.macaron_style else None
        self.norm_ff_macaron = nn.LayerNorm(hidden, eps=eps) if config.macaron_style else None
        self.ff_scale = 0.5 if config.macaron_style else 1.0
        self.norm_mha = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = self_attention(config, f"layers.{index}.self_attn")
        self.conv_module = ConformerConvolution(config) if config.use_cnn_module else None
        self.norm_conv = nn.LayerNorm(hidden, eps=eps) if config.use_cnn_module else None
        self.feed_forward = feed_forward()
        self.norm_ff = nn.LayerNorm(hidden, eps=eps)
        self.norm_final = nn.LayerNorm(hidden, eps=eps) if config.use_cnn_module else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        states: torch.Tensor,
        position_embeddings: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        frame_mask: torch.Tensor | None,
        stream: StreamContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.feed_forward_macaron is not None:
            states = states + self.ff_scale * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(states)))
        attended, weights = run_attention(
            self.self_attn, self.norm_mha(states), position_embeddings, attention_mask, stream
        )
        states = states + self.dropout(attended)
        if self.conv_module is not None:
            states = states + self.dropout(self.conv_module(self.norm_conv(states), frame_mask, stream))
        states = states + self.ff_scale * self.dropout(self.feed_forward(self.norm_ff(states)))
        if self.norm_final is not None:
            states = self.norm_final(states)
        return states, weights


class ConformerModel(SpeechEncoderModel):
    config_class = ConformerConfig
    layer_class = ConformerLayer
    _no_split_modules = ["ConformerLayer"]  # FSDP / device_map: one unit per layer


class ConformerForCTC(SpeechEncoderForCTC):
    config_class = ConformerConfig
    model_class = ConformerModel
    _no_split_modules = ["ConformerLayer"]


ConformerModel.register_for_auto_class("AutoModel")
ConformerForCTC.register_for_auto_class("AutoModelForCTC")
