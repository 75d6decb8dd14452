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

Absorbed inference (DeepSeek-V2's serving form): ``q_h · (W_uk,h c + b_k,h) = (W_uk,hᵀ q_h) · c + const``
and ``Σ p W_uv,h c + b_v,h = W_uv,h (Σ p c) + b_v,h``, so scores and the weighted sum can be taken on
the latent itself, as one key/value "head" shared by every query head, and nothing is expanded.
It is chosen per call when it needs fewer multiply-adds (a few queries against a long cache: a
decoder step, cross-attention to 1500 encoder frames), never in training, and not for rotary
hosts (whose keys are rotated between the up-projection and the key projection).
``config.mla_absorb`` = ``"auto"`` (default), ``"always"`` or ``"never"`` overrides the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention_base import AttentionGeometry, ConvertedAttention, LayerSpec
from .attention_positions import rotate_input

LATENT_LAYOUTS = ("joint", "split")
ABSORB_MODES = ("auto", "always", "never")


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

    # -- absorbed inference -------------------------------------------------------------------
    def absorbs(self, query_length: int, key_length: int) -> bool:
        """Whether this call runs on the latent (see the module docstring): the multiply-adds of
        expanding ``Tk`` latents and attending in the model width, against folding ``W_uk`` into
        ``Tq`` queries and attending in the latent width of every head."""
        mode = getattr(self.config, "mla_absorb", None) or "auto"
        if mode not in ABSORB_MODES:
            raise ValueError(f"mla_absorb must be one of {ABSORB_MODES}, got {mode!r}")
        if mode == "never" or self.training or self.position_mode == "rotary":
            return False
        if self.attention_implementation not in ("eager", "sdpa"):
            return False
        if mode == "always":
            return True
        part = self.latent_dim if self.latent_layout == "joint" else self.latent_dim // 2
        hidden = self.geometry.hidden_size
        expanded = 2 * key_length * part * hidden + 2 * query_length * key_length * hidden
        absorbed = 2 * query_length * part * hidden + 2 * query_length * key_length * self.num_heads * part
        return absorbed < expanded

    def attend(
        self,
        query: torch.Tensor,
        state: tuple[torch.Tensor, ...],
        attention_mask: torch.Tensor | None,
        position_embeddings: torch.Tensor | None,
        rotary: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        latent = state[0]
        if not self.absorbs(query.shape[2], latent.shape[2]):
            return super().attend(query, state, attention_mask, position_embeddings, rotary, **kwargs)
        heads, head_dim = self.num_heads, self.head_dim
        batch, _, length, _ = query.shape
        query, position_bias = self.content_query_and_bias(query, latent.shape[2], position_embeddings)
        # W_uk folded into the queries, one matmul per head over all rows ([H, B·Tq, d] @ [H, d, d_c];
        # a broadcast [B, H, Tq, d] @ [H, d, d_c] would copy the weight for every batch row). k_up's
        # bias only shifts a query's scores by a constant, which the softmax ignores.
        rows = query.transpose(0, 1).reshape(heads, batch * length, head_dim)
        folded = torch.matmul(rows, self.k_up.weight.view(heads, head_dim, -1))
        folded = folded.view(heads, batch, length, -1).transpose(0, 1)
        summed, weights = self.softmax_attention(
            folded,
            self._key_latent(latent).contiguous(),
            self._value_latent(latent).contiguous(),
            attention_mask,
            position_bias,
            **kwargs,
        )
        # W_uv applied after the weighted sum: [H, B·Tq, d_c] @ [H, d_c, d], back to [B, Tq, H, d]
        rows = summed.permute(2, 0, 1, 3).reshape(heads, batch * length, -1)
        output = torch.matmul(rows, self.v_up.weight.view(heads, head_dim, -1).transpose(1, 2))
        if self.v_up.bias is not None:
            output = output + self.v_up.bias.view(heads, 1, head_dim)
        return output.view(heads, batch, length, head_dim).permute(1, 2, 0, 3), weights
