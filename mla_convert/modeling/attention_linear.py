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
# Hedgehog (Zhang et al., 2024): φ(x) = [softmax(x W_h), softmax(−x W_h)] with a learnable d×d map per
# head, trained by attention transfer to reproduce the softmax attention weights.
LEARNED_FEATURE_MAPS = ("hedgehog",)


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
        known = sorted([*FEATURE_MAPS, *LEARNED_FEATURE_MAPS])
        if feature_map not in known:
            raise ValueError(f"feature_map must be one of {known}, got {feature_map!r}")
        self.feature_map = feature_map
        self.eps = eps
        self.k_proj = nn.Linear(geometry.hidden_size, geometry.hidden_size, bias=geometry.k_bias)
        self.v_proj = nn.Linear(geometry.hidden_size, geometry.hidden_size, bias=geometry.v_bias)
        if feature_map == "hedgehog":
            identity = torch.eye(self.head_dim).expand(self.num_heads, -1, -1).clone()
            self.feature_weight = nn.Parameter(identity)

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

    @property
    def feature_dim(self) -> int:
        return 2 * self.head_dim if self.feature_map == "hedgehog" else self.head_dim

    def state_values_per_token(self) -> int:
        # An encoder keeps nothing per token (the history is a fixed F×(d+1) sum per head); a
        # decoder caches its keys and values (see the module docstring).
        return 2 * self.num_heads * self.head_dim if self.is_causal else 0

    def fixed_state_values(self) -> int:
        return 0 if self.is_causal else self.num_heads * self.feature_dim * (self.head_dim + 1)

    def features(self, states: torch.Tensor, is_query: bool) -> torch.Tensor:
        """φ of queries or keys ``[B, H, T, d]``, each scaled by √scaling first (so φ(q)·φ(k) sees
        the same ``q·k/√d`` as softmax; Whisper-style hosts have already scaled the query)."""
        scale = self.scaling**0.5
        if is_query and self.geometry.scale_query:
            scale = self.scaling**-0.5
        states = states * scale
        if self.feature_map == "hedgehog":
            projected = torch.einsum("bhtd,hde->bhte", states, self.feature_weight)
            return torch.cat([projected.softmax(dim=-1), (-projected).softmax(dim=-1)], dim=-1)
        return FEATURE_MAPS[self.feature_map](states)

    def _masked_weights(self, query, key, attention_mask) -> torch.Tensor:
        """Normalised ``φ(q)φ(k)ᵀ`` with the causal and padding masks applied (zeroed)."""
        weights = torch.matmul(query, key.transpose(2, 3))
        causal = self.causal_mask(query.shape[2], key.shape[2], query.device)
        if causal is not None:
            weights = weights * causal
        if attention_mask is not None:
            allowed = attention_mask[..., : key.shape[2]]
            allowed = allowed if allowed.dtype == torch.bool else allowed > torch.finfo(allowed.dtype).min / 2
            weights = weights * allowed
        return weights / (weights.sum(-1, keepdim=True) + self.eps)

    def attention_weights(self, hidden_states, position_embeddings=None, key_value_states=None) -> torch.Tensor:
        rotary = self.rotary_of(position_embeddings)
        query = self.project_query(hidden_states, rotary)
        kv_input = hidden_states if key_value_states is None else key_value_states
        key, _ = self.kv_state(kv_input, rotary)
        query, _ = self.content_query_and_bias(query, key.shape[2], position_embeddings)
        return self._masked_weights(self.features(query, True), self.features(key, False), None)

    def attend(self, query, state, attention_mask, position_embeddings, rotary, **kwargs):
        key, value = state
        if self.position_mode == "relative":  # the content bias only: see the module docstring
            query = query + self.pos_bias_u[None, :, None, :]
        query, key = self.features(query, True), self.features(key, False)
        if self.is_causal:
            return torch.matmul(self._masked_weights(query, key, attention_mask), value).transpose(1, 2), None
        keep = key_padding_mask(attention_mask, key.shape[2])
        if keep is not None:
            key = key * keep[:, None, :, None].to(key.dtype)
        summary = torch.einsum("bhtd,bhte->bhde", key, value)
        normaliser = torch.einsum("bhtd,bhd->bht", query, key.sum(dim=2)).unsqueeze(-1)
        output = torch.einsum("bhtd,bhde->bhte", query, summary) / (normaliser + self.eps)
        return output.transpose(1, 2), None
