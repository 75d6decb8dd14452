"""Kernelised linear attention (Katharopoulos et al., 2020) with the trained projections.

``softmax(q kᵀ) v`` is replaced by ``φ(q) (φ(k)ᵀ v) / (φ(q) · Σ φ(k))``, which costs O(T) instead
of O(T²) for an encoder: the whole K/V history is summarised by ``Σ φ(k) vᵀ`` (``d × d`` per head)
and ``Σ φ(k)``, whatever the length.

Approximation (stated in every conversion report): an additive relative-position term
(Transformer-XL matrices b+d) cannot be carried through a kernel feature map exactly, so it is
dropped; the content-query bias ``pos_bias_u`` is kept. Rotary positions survive unchanged,
because the host rotates the layer input before the projections.

Causal (decoder) attention uses the masked form ``(φ(q)φ(k)ᵀ ⊙ M) v`` normalised by its row sums,
which is the same function as the running-sum recurrence and accepts any padding mask. A decoder
therefore still caches per-token keys and values here (and its report says so): the O(1)
recurrent cache is not implemented yet.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_base import AttentionGeometry, ConvertedAttention, key_padding_mask
from .attention_positions import rotate_input

FEATURE_MAPS = {
    "elu": lambda x: nn.functional.elu(x) + 1.0,
    "relu": nn.functional.relu,
}


class LinearAttention(ConvertedAttention):
    variant = "linear"

    def __init__(
        self,
        geometry: AttentionGeometry,
        position_mode: str,
        config=None,
        *,
        feature_map: str = "elu",
        eps: float = 1e-6,
        is_causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(geometry, position_mode, config, is_causal=is_causal, dropout=dropout)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        self.feature_map = feature_map
        self.eps = eps
        self.k_proj = nn.Linear(geometry.hidden_size, geometry.hidden_size, bias=geometry.k_bias)
        self.v_proj = nn.Linear(geometry.hidden_size, geometry.hidden_size, bias=geometry.v_bias)

    @classmethod
    def from_spec(cls, spec: dict, geometry: AttentionGeometry, position_mode: str, config=None, **kwargs):
        return cls(geometry, position_mode, config, feature_map=spec.get("feature_map", "elu"), **kwargs)

    def kv_state(self, kv_input: torch.Tensor, rotary: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        key_input = rotate_input(kv_input, rotary, self.num_heads)
        return self.split_heads(self.k_proj(key_input)), self.split_heads(self.v_proj(kv_input))

    def expand_state(
        self, state: tuple[torch.Tensor, ...], rotary: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return state[0], state[1]

    def state_values_per_token(self) -> int:
        # An encoder keeps nothing per token (the history is a fixed d×(d+1) sum per head); a
        # decoder caches its keys and values (see the module docstring).
        return 2 * self.num_heads * self.head_dim if self.is_causal else 0

    def fixed_state_values(self) -> int:
        return 0 if self.is_causal else self.num_heads * self.head_dim * (self.head_dim + 1)

    def attend(self, query, state, attention_mask, position_embeddings, rotary, **kwargs):
        key, value = state
        if self.position_mode == "relative":
            query = query + self.pos_bias_u[None, :, None, :]
        phi = FEATURE_MAPS[self.feature_map]
        query, key = phi(query * self.scaling**0.5), phi(key * self.scaling**0.5)
        if self.is_causal:
            weights = torch.matmul(query, key.transpose(2, 3))
            offset = key.shape[2] - query.shape[2]
            causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
            weights = weights * causal.tril(offset)
            if attention_mask is not None:
                allowed = attention_mask[..., : key.shape[2]]
                allowed = allowed if allowed.dtype == torch.bool else allowed > torch.finfo(allowed.dtype).min / 2
                weights = weights * allowed
            weights = weights / (weights.sum(-1, keepdim=True) + self.eps)
            return torch.matmul(weights, value).transpose(1, 2), None
        keep = key_padding_mask(attention_mask, key.shape[2])
        if keep is not None:
            key = key * keep[:, None, :, None].to(key.dtype)
        summary = torch.einsum("bhtd,bhte->bhde", key, value)
        normaliser = torch.einsum("bhtd,bhd->bht", query, key.sum(dim=2)).unsqueeze(-1)
        output = torch.einsum("bhtd,bhde->bhte", query, summary) / (normaliser + self.eps)
        return output.transpose(1, 2), None
