"""Attention transfer (Hedgehog): teach a linear attention's learnable feature map to reproduce the
softmax attention weights of the layer it replaces, on calibration activations, before any
end-to-end fine-tuning. Only the feature map is trained; the projections stay the trained ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..modeling.attention_base import ConvertedAttention
from ..modeling.attention_linear import LinearAttention


def fit_feature_maps(
    attention: LinearAttention,
    reference: ConvertedAttention,
    samples: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    steps: int = 300,
    learning_rate: float = 0.01,
) -> tuple[float, float]:
    """Minimise the cross-entropy between softmax and linear attention weights; returns the mean
    loss before and after. ``samples`` are ``(query input, key/value input or None for
    self-attention, position embeddings)`` of single unpadded sequences."""
    prepared = []
    with torch.no_grad():
        for query_input, key_value_input, positions in samples:
            target = reference.attention_weights(query_input, positions, key_value_input)
            rotary = attention.rotary_of(positions)
            query = attention.project_query(query_input, rotary)
            source = query_input if key_value_input is None else key_value_input
            key, _ = attention.kv_state(source, rotary)
            query, _ = attention.content_query_and_bias(query, key.shape[2], positions)
            prepared.append((target, query, key))

    def loss_of(target, query, key) -> torch.Tensor:
        weights = attention._masked_weights(attention.features(query, True), attention.features(key, False), None)
        return -(target * (weights + 1e-9).log()).sum(dim=-1).mean()

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(loss_of(*sample) for sample in prepared) / len(prepared))

    before = mean_loss()
    optimizer = torch.optim.Adam([attention.feature_weight], lr=learning_rate)
    with torch.enable_grad():
        for step in range(steps):
            optimizer.zero_grad()
            loss_of(*prepared[step % len(prepared)]).backward()
            optimizer.step()
    attention.feature_weight.requires_grad_(True)
    return before, mean_loss()
