"""Grouped-query attention: ``kv_heads`` key/value heads, each shared by a group of query heads.

Query head ``h`` reads key/value head ``h // (num_heads // kv_heads)`` (contiguous groups, the
layout of the GQA paper and of ``repeat_kv``). With ``kv_heads == num_heads`` this is exactly the
original multi-head attention, which the toolkit also uses as the reference when it measures
conversion errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention_base import AttentionGeometry, ConvertedAttention, LayerSpec
from .attention_positions import rotate_input


@dataclass(frozen=True)
class GQALayerSpec(LayerSpec):
    """A GQA layer: ``kv_heads`` key/value heads shared by the query heads."""

    kv_heads: int
    init: str = "mean-pool"
    attention = "gqa"


class GroupedQueryAttention(ConvertedAttention):
    variant = "gqa"
    layer_spec_class = GQALayerSpec

    def __init__(
        self,
        geometry: AttentionGeometry,
        position_mode: str,
        config=None,
        *,
        kv_heads: int,
        is_causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(geometry, position_mode, config, is_causal=is_causal, dropout=dropout)
        if kv_heads <= 0 or geometry.num_heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must divide num_heads={geometry.num_heads}")
        self.kv_heads = kv_heads
        self.num_key_value_groups = geometry.num_heads // kv_heads
        width = kv_heads * geometry.head_dim
        self.k_proj = nn.Linear(geometry.hidden_size, width, bias=geometry.k_bias)
        self.v_proj = nn.Linear(geometry.hidden_size, width, bias=geometry.v_bias)

    @classmethod
    def from_spec(cls, spec: GQALayerSpec, geometry: AttentionGeometry, position_mode: str, config=None, **kwargs):
        return cls(geometry, position_mode, config, kv_heads=int(spec.kv_heads), **kwargs)

    @property
    def layer_spec(self) -> GQALayerSpec:
        return GQALayerSpec(self.kv_heads)

    @classmethod
    def state_values(cls, spec: GQALayerSpec, geometry: AttentionGeometry) -> int:
        return 2 * int(spec.kv_heads) * geometry.head_dim  # kv_heads keys and values of head_dim each

    def kv_state(self, kv_input: torch.Tensor, rotary: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        key_input = rotate_input(kv_input, rotary, self.num_heads)
        return (
            self.split_heads(self.k_proj(key_input), self.kv_heads),
            self.split_heads(self.v_proj(kv_input), self.kv_heads),
        )

    def expand_state(
        self, state: tuple[torch.Tensor, ...], rotary: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return state[0], state[1]
