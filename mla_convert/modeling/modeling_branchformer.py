"""Branchformer CTC model (ESPnet2 ``BranchformerEncoder`` layout) with any attention variant.

Each layer runs two branches on the same input: self-attention (built by ``build_attention``
from the config: MHA, MLA, GQA or linear) and a convolutional gating MLP (cgMLP), and merges
them (``concat``, ``learned_ave`` or ``fixed_ave``) into the residual. Parameter names follow
ESPnet (``attn`` is ESPnet's name for the attention branch; ``cgmlp.csgu.conv``,
``merge_proj`` ...). Padded frames are zeroed before the gating convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_branchformer import BranchformerConfig
from .modeling_speech_encoder import (
    ACTIVATIONS,
    SpeechEncoderForCTC,
    SpeechEncoderModel,
    StreamContext,
    conv_padding,
    depthwise_conv,
    run_attention,
    self_attention,
    zero_padding,
)


class ConvolutionalSpatialGatingUnit(nn.Module):
    """Split the channels in halves; gate the first with a depthwise convolution of the second."""

    def __init__(self, config: BranchformerConfig) -> None:
        super().__init__()
        channels, kernel = config.cgmlp_linear_units // 2, config.cgmlp_conv_kernel
        self.norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.causal = config.causal_conv
        self.conv = nn.Conv1d(channels, channels, kernel, 1, conv_padding(kernel, self.causal), groups=channels)
        self.linear = nn.Linear(channels, channels) if config.use_linear_after_conv else None
        gate = config.gate_activation
        self.act = nn.Identity() if gate == "identity" else ACTIVATIONS[gate]()
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, states: torch.Tensor, frame_mask: torch.Tensor | None, stream: StreamContext | None = None
    ) -> torch.Tensor:
        kept, gate = states.chunk(2, dim=-1)
        gate = zero_padding(self.norm(gate), frame_mask)
        gate = depthwise_conv(self.conv, gate.transpose(1, 2), self.causal, stream).transpose(1, 2)
        if self.linear is not None:
            gate = self.linear(gate)
        return self.dropout(kept * self.act(gate))


class ConvolutionalGatingMLP(nn.Module):
    """ESPnet ``ConvolutionalGatingMLP``: Linear + GELU up, the gating unit, Linear down."""

    def __init__(self, config: BranchformerConfig) -> None:
        super().__init__()
        self.channel_proj1 = nn.Sequential(nn.Linear(config.hidden_size, config.cgmlp_linear_units), nn.GELU())
        self.csgu = ConvolutionalSpatialGatingUnit(config)
        self.channel_proj2 = nn.Linear(config.cgmlp_linear_units // 2, config.hidden_size)

    def forward(
        self, states: torch.Tensor, frame_mask: torch.Tensor | None, stream: StreamContext | None = None
    ) -> torch.Tensor:
        return self.channel_proj2(self.csgu(self.channel_proj1(states), frame_mask, stream))


def masked_pooling_weights(scores: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over time of ``scores`` ``[B, 1, T]``, padded frames excluded."""
    if frame_mask is None:
        return torch.softmax(scores, dim=-1)
    padded = ~frame_mask[:, None, :]
    scores = scores.masked_fill(padded, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1).masked_fill(padded, 0.0)


class BranchformerLayer(nn.Module):
    def __init__(self, config: BranchformerConfig, index: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.hidden_size = hidden
        self.merge_method = config.merge_method
        self.cgmlp_weight = config.cgmlp_weight
        self.attn_branch_drop_rate = config.attn_branch_drop_rate
        self.attn = self_attention(config, f"layers.{index}.attn")
        self.cgmlp = ConvolutionalGatingMLP(config)
        self.norm_mha = nn.LayerNorm(hidden, eps=eps)
        self.norm_mlp = nn.LayerNorm(hidden, eps=eps)
        self.norm_final = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(config.dropout)
        if config.merge_method == "concat":
            self.merge_proj = nn.Linear(2 * hidden, hidden)
        else:
            self.merge_proj = nn.Linear(hidden, hidden)
        if config.merge_method == "learned_ave":
            self.pooling_proj1 = nn.Linear(hidden, 1)
            self.pooling_proj2 = nn.Linear(hidden, 1)
            self.weight_proj1 = nn.Linear(hidden, 1)
            self.weight_proj2 = nn.Linear(hidden, 1)

    def learned_weights(
        self, attended: torch.Tensor, gated: torch.Tensor, frame_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each branch pooled over time by its own attention scores, one logit per branch, and a
        softmax over the two: ``(w_attention, w_cgmlp)`` each ``[B, 1, 1]``."""
        logits = []
        for branch, pooling, weight in (
            (attended, self.pooling_proj1, self.weight_proj1),
            (gated, self.pooling_proj2, self.weight_proj2),
        ):
            scores = pooling(branch).transpose(1, 2) / self.hidden_size**0.5
            pooled = torch.matmul(masked_pooling_weights(scores, frame_mask), branch).squeeze(1)
            logits.append(weight(pooled))
        weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)[..., None, None]
        return weights[:, 0], weights[:, 1]

    def forward(
        self,
        states: torch.Tensor,
        position_embeddings: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        frame_mask: torch.Tensor | None,
        stream: StreamContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = run_attention(self.attn, self.norm_mha(states), position_embeddings, attention_mask, stream)
        attended = self.dropout(attended)
        gated = self.dropout(self.cgmlp(self.norm_mlp(states), frame_mask, stream))
        if self.merge_method == "concat":
            merged = self.merge_proj(torch.cat([attended, gated], dim=-1))
        elif self.merge_method == "fixed_ave":
            merged = self.merge_proj((1.0 - self.cgmlp_weight) * attended + self.cgmlp_weight * gated)
        else:
            drop_attention = (
                self.training and self.attn_branch_drop_rate > 0 and torch.rand(()) < self.attn_branch_drop_rate
            )
            if drop_attention:
                merged = self.merge_proj(gated)
            else:
                w_attention, w_cgmlp = self.learned_weights(attended, gated, frame_mask)
                merged = self.merge_proj(w_attention * attended + w_cgmlp * gated)
        return self.norm_final(states + self.dropout(merged)), weights


class BranchformerModel(SpeechEncoderModel):
    config_class = BranchformerConfig
    layer_class = BranchformerLayer
    _no_split_modules = ["BranchformerLayer"]  # FSDP / device_map: one unit per layer


class BranchformerForCTC(SpeechEncoderForCTC):
    config_class = BranchformerConfig
    model_class = BranchformerModel
    _no_split_modules = ["BranchformerLayer"]


BranchformerModel.register_for_auto_class("AutoModel")
BranchformerForCTC.register_for_auto_class("AutoModelForCTC")
