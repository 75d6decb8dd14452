"""Builds an attention variant from the plain dict stored in a converted model's config."""

from __future__ import annotations

from .attention_base import AttentionGeometry, ConvertedAttention
from .attention_gqa import GroupedQueryAttention
from .attention_linear import LinearAttention
from .attention_mla import MultiHeadLatentAttention

VARIANTS: dict[str, type[ConvertedAttention]] = {
    "mla": MultiHeadLatentAttention,
    "gqa": GroupedQueryAttention,
    "linear": LinearAttention,
}


def build_attention(
    layer_spec: dict,
    geometry: AttentionGeometry,
    position_mode: str,
    config=None,
    *,
    is_causal: bool = False,
    dropout: float = 0.0,
) -> ConvertedAttention:
    """An empty (unseeded) attention module of the kind ``layer_spec["attention"]`` names."""
    kind = layer_spec["attention"]
    if kind not in VARIANTS:
        raise ValueError(f"unknown attention variant {kind!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[kind].from_spec(layer_spec, geometry, position_mode, config, is_causal=is_causal, dropout=dropout)
