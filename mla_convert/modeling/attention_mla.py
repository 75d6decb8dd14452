"""Multi-head Latent Attention (DeepSeek-V2 form) for encoders and decoders.

Per token only a latent ``c = W_down x`` of ``latent_dim`` numbers is kept (that is what a
decoder cache stores); keys and values are rebuilt from it: ``K = W_uk c + b_k``,
``V = W_uv c + b_v``. Queries and the output projection are the trained ones.

Layouts: ``joint`` (one latent shared by K and V, seeded by an SVD of the stacked ``[W_k; W_v]``)
and ``split`` (the first half of the latent feeds K, the second half V; two separate SVDs, kept
to compare against the earlier public attempt).

Rotary hosts: wav2vec2-conformer rotates the layer input *before* ``linear_k`` while values use
the un-rotated input, so ``K = W_k R_t(x)`` cannot be written as ``W_uk c`` with a
position-independent ``W_uk``. Here the latent compresses the un-rotated layer input; the key
path up-projects the latent back to the input space (``k_up``), applies the rotation, then the
trained key projection (``k_proj``). With ``latent_dim = hidden_size`` and an orthonormal
down-projection, ``k_up(kv_down(x)) = x`` and the module is exact; below that it keeps the input
subspace that matters most to ``[W_k; W_v]``. Values stay ``W_uv c`` as in the other modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention_base import AttentionGeometry, ConvertedAttention, LayerSpec
from .attention_positions import rotate_input

LATENT_LAYOUTS = ("joint", "split")


@dataclass(frozen=True)
class MLALayerSpec(LayerSpec):
    """An MLA layer: ``latent_dim`` values per token, ``joint`` (shared by K and V) or ``split``."""

    latent_dim: int
    latent_layout: str = "joint"
    init: str = "svd"
    attention = "mla"


class MultiHeadLatentAttention(ConvertedAttention):
    variant = "mla"
    layer_spec_class = MLALayerSpec

    def __init__(
        self,
        geometry: AttentionGeometry,
        position_mode: str,
        config=None,
        *,
        latent_dim: int,
        latent_layout: str = "joint",
        is_causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(geometry, position_mode, config, is_causal=is_causal, dropout=dropout)
        if latent_layout not in LATENT_LAYOUTS:
            raise ValueError(f"latent_layout must be one of {LATENT_LAYOUTS}, got {latent_layout!r}")
        if latent_layout == "split" and latent_dim % 2:
            raise ValueError("a split latent needs an even latent_dim")
        hidden = geometry.hidden_size
        self.latent_dim = latent_dim
        self.latent_layout = latent_layout
        part = latent_dim if latent_layout == "joint" else latent_dim // 2
        self.kv_down = nn.Linear(hidden, latent_dim, bias=False)
        self.v_up = nn.Linear(part, hidden, bias=geometry.v_bias)
        if position_mode == "rotary":
            self.k_up = nn.Linear(part, hidden, bias=False)
            self.k_proj = nn.Linear(hidden, hidden, bias=geometry.k_bias)
        else:
            self.k_up = nn.Linear(part, hidden, bias=geometry.k_bias)

    @classmethod
    def from_spec(cls, spec: MLALayerSpec, geometry: AttentionGeometry, position_mode: str, config=None, **kwargs):
        return cls(
            geometry, position_mode, config, latent_dim=int(spec.latent_dim), latent_layout=spec.latent_layout, **kwargs
        )

    @property
    def layer_spec(self) -> MLALayerSpec:
        return MLALayerSpec(self.latent_dim, self.latent_layout)

    @classmethod
    def state_values(cls, spec: MLALayerSpec, geometry: AttentionGeometry) -> int:
        return int(spec.latent_dim)  # the latent c; keys and values are rebuilt from it

    def _key_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent if self.latent_layout == "joint" else latent[..., : self.latent_dim // 2]

    def _value_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent if self.latent_layout == "joint" else latent[..., self.latent_dim // 2 :]

    def kv_state(self, kv_input: torch.Tensor, rotary: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        # [B, 1, T, d_c]: one "head" so that HF caches (which concatenate on dim -2) can hold it.
        return (self.kv_down(kv_input).unsqueeze(1),)

    def expand_state(
        self, state: tuple[torch.Tensor, ...], rotary: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        latent = state[0].squeeze(1)
        key = self.k_up(self._key_latent(latent))
        if self.position_mode == "rotary":
            key = self.k_proj(rotate_input(key, rotary, self.num_heads))
        value = self.v_up(self._value_latent(latent))
        return self.split_heads(key), self.split_heads(value)
