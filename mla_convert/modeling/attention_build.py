"""The variant table: a layer spec (or the dict ``config.json`` stores) -> its attention module, and
the one K/V-state formula for any layer, converted or not."""

from __future__ import annotations

from .attention_base import AttentionGeometry, ConvertedAttention, LayerSpec, mha_state_values
from .attention_gqa import GroupedQueryAttention
from .attention_linear import LinearAttention
from .attention_mha import MultiHeadAttention
from .attention_mla import MultiHeadLatentAttention

VARIANTS: dict[str, type[ConvertedAttention]] = {
    "mha": MultiHeadAttention,
    "mla": MultiHeadLatentAttention,
    "gqa": GroupedQueryAttention,
    "linear": LinearAttention,
}


def variant_class(kind: str) -> type[ConvertedAttention]:
    if kind not in VARIANTS:
        raise ValueError(f"unknown attention variant {kind!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[kind]


def layer_spec_from_dict(data: dict | LayerSpec) -> LayerSpec:
    """A stored per-layer dict (``{"attention": "mla", "latent_dim": 96, ...}``) as its typed spec."""
    if isinstance(data, LayerSpec):
        return data
    return variant_class(data.get("attention")).layer_spec_class.from_dict(data)


def state_values(layer: dict | LayerSpec | None, geometry: AttentionGeometry) -> int:
    """K/V-state values per token of one attention layer: its variant's formula, or multi-head
    attention's ``2·hidden`` when the layer is not converted (``None``)."""
    if not layer:
        return mha_state_values(geometry)
    spec = layer_spec_from_dict(layer)
    return variant_class(spec.attention).state_values(spec, geometry)


def build_attention(
    layer_spec: dict | LayerSpec,
    geometry: AttentionGeometry,
    position_mode: str,
    config=None,
    *,
    is_causal: bool = False,
    dropout: float = 0.0,
) -> ConvertedAttention:
    """An empty (unseeded) attention module of the variant the layer spec names."""
    spec = layer_spec_from_dict(layer_spec)
    return variant_class(spec.attention).from_spec(
        spec, geometry, position_mode, config, is_causal=is_causal, dropout=dropout
    )
