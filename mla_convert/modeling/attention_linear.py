"""Kernelised linear attention (Katharopoulos et al., 2020) with the trained projections.

``softmax(q kᵀ) v`` is replaced by ``φ(q) (φ(k)ᵀ v) / (φ(q) · Σ φ(k))``, which costs O(T) instead
of O(T²) for an encoder: the whole K/V history is summarised by ``Σ φ(k) vᵀ`` (``F × d`` per head,
``F`` the feature width: ``d`` for elu/relu, ``2d`` for hedgehog) and ``Σ φ(k)``, whatever the length.

Approximation (stated in every conversion report): an additive relative-position term
(Transformer-XL matrices b+d) cannot be carried through a kernel feature map exactly, so it is
dropped; the content-query bias ``pos_bias_u`` is kept. Rotary positions survive unchanged,
because the host rotates the layer input before the projections.

Causal (decoder) attention over a whole sequence (training, teacher forcing) uses the masked form
``(φ(q)φ(k)ᵀ ⊙ M) v`` normalised by its row sums. When generating, a host hands in a
:class:`RunningSummaryLayer` instead of a per-token cache: each step adds ``Σ φ(k) vᵀ`` and
``Σ φ(k)`` of its new tokens to the running sums and reads the earlier tokens from them, which is
the same function. So a linear-attention decoder keeps a fixed ``H × F × (d + 1)`` state per layer
and sequence, whatever the length, and nothing per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from .attention_base import AttentionGeometry, ConvertedAttention, LayerSpec, key_padding_mask
from .attention_positions import rotate_input

FEATURE_MAPS = {
    "elu": lambda x: nn.functional.elu(x) + 1.0,
    "relu": nn.functional.relu,
}
# Hedgehog (Zhang et al., 2024): φ(x) = [softmax(x W_h), softmax(−x W_h)] with a learnable d×d map per
# head, trained by attention transfer to reproduce the softmax attention weights.
LEARNED_FEATURE_MAPS = ("hedgehog",)


@dataclass(frozen=True)
class LinearLayerSpec(LayerSpec):
    """A linear-attention layer with feature map ``feature_map`` (elu, relu or the learnable hedgehog)."""

    feature_map: str = "elu"
    init: str = "copy"
    attention = "linear"


def feature_dim(feature_map: str, head_dim: int) -> int:
    """F, the width of φ: hedgehog's ``[softmax(xW), softmax(-xW)]`` is twice the head size."""
    return 2 * head_dim if feature_map in LEARNED_FEATURE_MAPS else head_dim


class LinearAttention(ConvertedAttention):
    variant = "linear"
    layer_spec_class = LinearLayerSpec

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
    def from_spec(cls, spec: LinearLayerSpec, geometry: AttentionGeometry, position_mode: str, config=None, **kwargs):
        return cls(geometry, position_mode, config, feature_map=spec.feature_map, **kwargs)

    @property
    def layer_spec(self) -> LinearLayerSpec:
        return LinearLayerSpec(self.feature_map)

    @classmethod
    def state_values(cls, spec: LinearLayerSpec, geometry: AttentionGeometry) -> int:
        return 0  # nothing per token: the history is a fixed F×(d+1) sum per head (module docstring)

    @classmethod
    def fixed_values(cls, spec: LinearLayerSpec, geometry: AttentionGeometry) -> int:
        return geometry.num_heads * feature_dim(spec.feature_map, geometry.head_dim) * (geometry.head_dim + 1)

    def kv_state(self, kv_input: torch.Tensor, rotary: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        key_input = rotate_input(kv_input, rotary, self.num_heads)
        return self.split_heads(self.k_proj(key_input)), self.split_heads(self.v_proj(kv_input))

    def expand_state(
        self, state: tuple[torch.Tensor, ...], rotary: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return state[0], state[1]

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.feature_map, self.head_dim)

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
        weights = self._masked_scores(query, key, attention_mask)
        return weights / (weights.sum(-1, keepdim=True) + self.eps)

    def _masked_scores(self, query, key, attention_mask) -> torch.Tensor:
        """``φ(q)φ(k)ᵀ`` with the causal and padding masks applied (zeroed), not normalised."""
        weights = torch.matmul(query, key.transpose(2, 3))
        causal = self.causal_mask(query.shape[2], key.shape[2], query.device)
        if causal is not None:
            weights = weights * causal
        if attention_mask is not None:
            allowed = attention_mask[..., : key.shape[2]]
            allowed = allowed if allowed.dtype == torch.bool else allowed > torch.finfo(allowed.dtype).min / 2
            weights = weights * allowed
        return weights

    def attention_weights(self, hidden_states, position_embeddings=None, key_value_states=None) -> torch.Tensor:
        rotary = self.rotary_of(position_embeddings)
        query = self.project_query(hidden_states, rotary)
        kv_input = hidden_states if key_value_states is None else key_value_states
        key, _ = self.kv_state(kv_input, rotary)
        query, _ = self.content_query_and_bias(query, key.shape[2], position_embeddings)
        return self._masked_weights(self.features(query, True), self.features(key, False), None)

    def forward(
        self, hidden_states: torch.Tensor, *args, running_summary: RunningSummaryLayer | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`ConvertedAttention.forward`; with a ``running_summary`` (causal self-attention
        while generating) the earlier tokens come from its running sums instead of a K/V cache."""
        if running_summary is None:
            return super().forward(hidden_states, *args, **kwargs)
        return self._forward_recurrent(hidden_states, running_summary, **kwargs)

    def _forward_recurrent(
        self,
        hidden_states: torch.Tensor,
        running_summary: RunningSummaryLayer,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.is_causal or key_value_states is not None:
            raise ValueError("a running summary replaces the cache of causal self-attention only")
        rotary = self.rotary_of(position_embeddings)
        key, value = self.kv_state(hidden_states, rotary)
        query, key = self._featurised(self.project_query(hidden_states, rotary), key)
        past, length = running_summary.get_seq_length(), key.shape[2]
        chunk_mask = None if attention_mask is None else attention_mask[..., past : past + length]
        scores = self._masked_scores(query, key, chunk_mask)  # the new tokens among themselves
        numerator, denominator = torch.matmul(scores, value), scores.sum(-1)
        key_value_sum, key_sum = self._sums(self._drop_padded_keys(key, chunk_mask), value)
        if past:  # every earlier token, through the running sums
            previous_kv, previous_k = running_summary.keys, running_summary.values
            numerator = numerator + torch.matmul(query, previous_kv)
            denominator = denominator + torch.einsum("bhtf,bhf->bht", query, previous_k)
            key_value_sum, key_sum = key_value_sum + previous_kv, key_sum + previous_k
        running_summary.store(key_value_sum, key_sum, length)
        normaliser = denominator.unsqueeze(-1) + self.eps
        output = (numerator / normaliser).transpose(1, 2)
        # the weights of earlier tokens are folded into the sums: only a first chunk has them all
        weights = scores / normaliser if kwargs.get("output_attentions") and not past else None
        return self.out_proj(output.reshape(*hidden_states.shape[:-1], -1)), weights

    def stream(self, hidden_states, past, position_embeddings, chunk_size, left_chunks):
        """One chunk of chunked attention (see :meth:`ConvertedAttention.stream`) from running sums:
        ``past`` is ``(Σ φ(k) vᵀ, Σ φ(k))`` of each kept earlier chunk, ``[B, H, n, F, d]`` and
        ``[B, H, n, F]``; with all the left context (``left_chunks=None``) they are kept as one
        summed chunk, so the state is ``H × F × (d + 1)`` per layer whatever the length."""
        rotary = self.rotary_of(position_embeddings)
        length = hidden_states.shape[1]
        rotary = None if rotary is None else rotary[:, -length:]
        key, value = self.kv_state(hidden_states, rotary)
        query, key = self._featurised(self.project_query(hidden_states, rotary), key)
        key_value_sum, key_sum = self._sums(key, value)
        key_value_sum, key_sum = key_value_sum[:, :, None], key_sum[:, :, None]
        if past is not None:
            key_value_sum = torch.cat([past[0], key_value_sum], dim=2)
            key_sum = torch.cat([past[1], key_sum], dim=2)
        output = self._read(query, key_value_sum.sum(dim=2), key_sum.sum(dim=2)).transpose(1, 2)
        output = self.out_proj(output.reshape(*hidden_states.shape[:-1], -1))
        if left_chunks is None:
            kept = (key_value_sum.sum(dim=2, keepdim=True), key_sum.sum(dim=2, keepdim=True))
        else:
            start = max(0, key_sum.shape[2] - left_chunks)
            kept = (key_value_sum[:, :, start:], key_sum[:, :, start:])
        return output, kept

    def attend(self, query, state, attention_mask, position_embeddings, rotary, **kwargs):
        key, value = state
        query, key = self._featurised(query, key)
        if self.is_causal or (attention_mask is not None and attention_mask.shape[-2] > 1):
            # causal, or a mask per query (chunked attention): the masked form over the whole sequence
            weights = self._masked_weights(query, key, attention_mask)
            return torch.matmul(weights, value).transpose(1, 2), weights
        output = self._read(query, *self._sums(self._drop_padded_keys(key, attention_mask), value))
        # the T x T weights are never formed on this path; only when asked for
        weights = self._masked_weights(query, key, attention_mask) if kwargs.get("output_attentions") else None
        return output.transpose(1, 2), weights

    def _featurised(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(φ(q), φ(k))``; relative models add the content bias only (see the module docstring)."""
        if self.position_mode == "relative":
            query = query + self.pos_bias_u[None, :, None, :]
        return self.features(query, True), self.features(key, False)

    def _read(self, query: torch.Tensor, key_value_sum: torch.Tensor, key_sum: torch.Tensor) -> torch.Tensor:
        """``φ(q) (Σ φ(k) vᵀ) / (φ(q) · Σ φ(k))``: the queries read out of the sums, ``[B, H, T, d]``."""
        normaliser = torch.einsum("bhtf,bhf->bht", query, key_sum).unsqueeze(-1)
        return torch.matmul(query, key_value_sum) / (normaliser + self.eps)

    @staticmethod
    def _drop_padded_keys(key: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        keep = key_padding_mask(attention_mask, key.shape[2])
        return key if keep is None else key * keep[:, None, :, None].to(key.dtype)

    @staticmethod
    def _sums(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ φ(k) vᵀ, Σ φ(k))`` over the tokens: the whole history linear attention needs."""
        return torch.einsum("bhtf,bhtd->bhfd", key, value), key.sum(dim=2)


class RunningSummaryLayer(DynamicLayer):
    """A ``transformers`` cache layer for causal linear attention: ``keys`` holds ``Σ φ(k) vᵀ``
    ``[B, H, F, d]`` and ``values`` holds ``Σ φ(k)`` ``[B, H, F]``, replaced (not grown) at every
    step; the token count is kept so positions and masks see the true length."""

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.tokens = 0

    def store(self, key_value_sum: torch.Tensor, key_sum: torch.Tensor, new_tokens: int) -> None:
        self.keys, self.values = key_value_sum, key_sum
        self.dtype, self.device = key_value_sum.dtype, key_value_sum.device
        self.is_initialized = True
        self.tokens += new_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a running-summary layer is written through store(), not update()")

    def get_seq_length(self) -> int:
        return self.tokens if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self.tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a running summary cannot be cropped back to an earlier length")


def running_summary_layer(cache, layer_idx: int) -> RunningSummaryLayer:
    """The :class:`RunningSummaryLayer` at ``layer_idx`` of a ``DynamicCache``, put there (in place
    of a fresh per-token layer) on first use."""
    layers = cache.layers
    while len(layers) < layer_idx:  # caches that add their layers lazily
        layers.append(cache.layer_class_to_replicate())
    if len(layers) == layer_idx:
        layers.append(RunningSummaryLayer())
    layer = layers[layer_idx]
    if not isinstance(layer, RunningSummaryLayer):
        if layer.get_seq_length():
            raise RuntimeError(f"cache layer {layer_idx} already holds per-token keys and values")
        layer = layers[layer_idx] = RunningSummaryLayer()
    return layer
