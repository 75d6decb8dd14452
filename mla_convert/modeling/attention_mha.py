"""Multi-head attention as a variant: every head keeps its own keys and values.

This is the attention models of mla_convert's own families (Conformer, Branchformer) are trained
with before any conversion. It is grouped-query attention with one key/value head per query head,
so no attention math is written again; it only names the case, gives it a layer spec with no
fields and states its size, ``2·hidden`` values per token (the formula every report uses for
unconverted layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention_base import AttentionGeometry, LayerSpec, mha_state_values
from .attention_gqa import GroupedQueryAttention


@dataclass(frozen=True)
class MHALayerSpec(LayerSpec):
    """A multi-head attention layer (nothing to choose: its shape is the geometry's)."""

    init: str = "trained"
    attention = "mha"


class MultiHeadAttention(GroupedQueryAttention):
    variant = "mha"
    layer_spec_class = MHALayerSpec

    def __init__(
        self,
        geometry: AttentionGeometry,
        position_mode: str,
        config=None,
        *,
        is_causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            geometry, position_mode, config, kv_heads=geometry.num_heads, is_causal=is_causal, dropout=dropout
        )

    @classmethod
    def from_spec(cls, spec: MHALayerSpec, geometry: AttentionGeometry, position_mode: str, config=None, **kwargs):
        return cls(geometry, position_mode, config, **kwargs)

    @property
    def layer_spec(self) -> MHALayerSpec:
        return MHALayerSpec()

    @classmethod
    def state_values(cls, spec: MHALayerSpec, geometry: AttentionGeometry) -> int:
        return mha_state_values(geometry)
