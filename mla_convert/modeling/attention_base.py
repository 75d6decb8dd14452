"""The part every converted attention shares: queries, output projection, positions, dispatch.

A variant (MLA, GQA, linear) only decides what is kept per token for keys and values (its
*state*: the thing a cache stores) and how keys and values are rebuilt from it. Everything else
(query projection, relative/rotary positions, masks, the choice of attention kernel) is here once,
so no attention math is repeated between variants or between host models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_positions import POSITION_MODES, relative_position_scores, rotate_input

StateUpdate = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


@dataclass
class AttentionGeometry:
    """Shapes and bias layout of the attention being replaced (read off the trained module)."""

    hidden_size: int
    num_heads: int
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    o_bias: bool = True
    # Whisper multiplies the projected query by the scale before the dot product instead of
    # scaling the scores; keeping the order keeps conversions at full rank bit-for-bit faithful.
    scale_query: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


def mha_state_values(geometry: AttentionGeometry) -> int:
    """Values per token an unconverted multi-head attention keeps: all its keys and values."""
    return 2 * geometry.hidden_size


@dataclass(frozen=True)
class LayerSpec:
    """What one converted layer is, as stored per layer in ``config.json``
    (``attention_conversion.layers``): the variant's name and the fields it is built from.

    Each variant module defines its subclass next to the module class; the remote code rebuilds a
    layer from this alone. ``init`` records how the layer was seeded (it does not change the module).
    """

    attention: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"attention": self.attention, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> LayerSpec:
        """The stored dict back (keys this version does not know are ignored: configs written by a
        newer toolkit still load)."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def fold_groups(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H, Tq, d]`` queries as ``[B, H_kv, G·Tq, d]``: the ``G = H / H_kv`` query heads that
    share one key/value head become extra query rows of it, so no key or value is ever repeated
    (head ``h`` reads key/value head ``h // G``; row ``g·Tq + t`` is query ``t`` of head ``kv·G + g``)."""
    batch, heads, length, dim = query.shape
    return query.reshape(batch, kv_heads, (heads // kv_heads) * length, dim)


def fold_mask(mask: torch.Tensor | None, kv_heads: int, groups: int, query_length: int) -> torch.Tensor | None:
    """A ``[B, 1 or H, Tq, Tk]`` mask (or score bias) laid out for :func:`fold_groups`' rows."""
    if mask is None or groups == 1:
        return mask
    if mask.shape[1] == 1:
        return mask if mask.shape[2] == 1 else mask.repeat(1, 1, groups, 1)
    return mask.reshape(mask.shape[0], kv_heads, groups * query_length, mask.shape[-1])


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference softmax attention; accepts fewer K/V heads than query heads (GQA, and absorbed
    MLA's single latent "head"), whose query heads are folded onto their K/V head, not repeated."""
    batch, heads, length, _ = query.shape
    kv_heads, key_length = key.shape[1], key.shape[2]
    scores = torch.matmul(fold_groups(query, kv_heads), key.transpose(2, 3)) * scaling
    scores = scores.view(batch, heads, length, key_length)
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is None and getattr(module, "is_causal", False) and length > 1:
        attention_mask = module.causal_mask(length, key_length, query.device)  # no mask: the kernels' rule
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., :key_length], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :key_length]
    weights = nn.functional.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights.view(batch, kv_heads, -1, key_length), value)
    output = output.view(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous()
    return output, weights


_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """PyTorch's fused attention with fewer K/V heads than query heads, K/V never repeated.

    Unmasked causal prefill uses the kernel's own grouped heads (``enable_gqa``, so flash kernels
    stay eligible); otherwise the query heads are folded onto their K/V head (:func:`fold_groups`),
    which any kernel and torch release runs, and which is how a single-token decode step or an
    absorbed MLA (one latent "head") reads its cache.
    """
    batch, heads, length, _ = query.shape
    kv_heads, key_length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    mask = None if attention_mask is None else attention_mask[..., :key_length]
    if position_bias is not None:
        mask = with_score_bias(mask, position_bias)
    causal = mask is None and getattr(module, "is_causal", False) and length > 1
    dropout = dropout if module.training else 0.0
    if causal and length == key_length and _SDPA_HAS_GQA:
        output = nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1
        )
        return output.transpose(1, 2).contiguous(), None
    if causal:
        mask = module.causal_mask(length, key_length, query.device)
    output = nn.functional.scaled_dot_product_attention(
        fold_groups(query, kv_heads),
        key,
        value,
        attn_mask=fold_mask(mask, kv_heads, groups, length),
        dropout_p=dropout,
        scale=scaling,
    )
    output = output.view(batch, heads, length, value.shape[-1])
    return output.transpose(1, 2).contiguous(), None


def with_score_bias(attention_mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An additive float mask ``[B, H, Tq, Tk]`` holding ``bias`` where the boolean or additive
    ``attention_mask`` lets a query see a key, and the dtype's minimum where it does not."""
    if attention_mask is None:
        return bias
    mask = attention_mask[..., : bias.shape[-1]]
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    return bias + mask.to(bias.dtype)


def key_padding_mask(attention_mask: torch.Tensor | None, key_length: int) -> torch.Tensor | None:
    """``[B, Tk]`` bool (True = real key) from a 4-D boolean or additive attention mask."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, 0, :, :key_length]
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return visible.any(dim=1)


class ConvertedAttention(nn.Module, ABC):
    """Base class of the attention variants; subclasses define the per-token K/V state.

    ``forward`` returns ``(output, attention_weights_or_None)`` like the host modules it replaces.
    ``state_update`` lets a host plug in its cache: it receives the state of the new tokens and
    returns the state of all tokens so far (for MLA that is the latent, so the cache holds d_c
    values per token, never the expanded keys and values).
    """

    variant: str = ""
    layer_spec_class: ClassVar[type[LayerSpec]] = LayerSpec

    def __init__(
        self,
        geometry: AttentionGeometry,
        position_mode: str,
        config=None,
        is_causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        hidden = geometry.hidden_size
        self.geometry = geometry
        self.config = config
        self.position_mode = position_mode
        self.num_heads = geometry.num_heads
        self.head_dim = geometry.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = is_causal
        self.dropout = dropout
        self.num_key_value_groups = 1
        self.q_proj = nn.Linear(hidden, hidden, bias=geometry.q_bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=geometry.o_bias)
        if position_mode == "relative":
            self.pos_proj = nn.Linear(hidden, hidden, bias=False)
            self.pos_bias_u = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
            self.pos_bias_v = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))

    # -- what a variant defines ---------------------------------------------------------------
    @abstractmethod
    def kv_state(self, kv_input: torch.Tensor, rotary: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The per-token tensors kept for keys/values, each ``[B, *, T, *]``."""

    @abstractmethod
    def expand_state(
        self, state: tuple[torch.Tensor, ...], rotary: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H_kv, T, d]`` rebuilt from the state."""

    @classmethod
    @abstractmethod
    def state_values(cls, spec: LayerSpec, geometry: AttentionGeometry) -> int:
        """How many numbers the state holds per token (per layer): THE cache-size formula, asked
        for by conversion reports, evaluation JSON and model cards alike."""

    @classmethod
    def fixed_values(cls, spec: LayerSpec, geometry: AttentionGeometry) -> int:
        """Numbers held per layer and sequence whatever its length (linear attention's sums); 0 here."""
        return 0

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: LayerSpec, geometry: AttentionGeometry, position_mode: str, config=None, **kwargs):
        """An empty (unseeded) module of this variant built from its layer spec."""

    @property
    @abstractmethod
    def layer_spec(self) -> LayerSpec:
        """This module's layer spec as far as the module knows it: its shape fields (``init``, how
        it was seeded, stays at its default; ``config.json`` holds the recorded one)."""

    def state_values_per_token(self) -> int:
        return self.state_values(self.layer_spec, self.geometry)

    def fixed_state_values(self) -> int:
        return self.fixed_values(self.layer_spec, self.geometry)

    # -- shared machinery ---------------------------------------------------------------------
    def split_heads(self, states: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, num_heads or self.num_heads, -1).transpose(1, 2)

    def rotary_of(self, position_embeddings: torch.Tensor | None) -> torch.Tensor | None:
        if self.position_mode != "rotary":
            return None
        if position_embeddings is None:
            raise ValueError("rotary attention needs the rotary position embeddings")
        return position_embeddings

    def key_value(
        self, kv_input: torch.Tensor, position_embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values this module attends to for ``kv_input`` (used to measure errors)."""
        rotary = self.rotary_of(position_embeddings)
        return self.expand_state(self.kv_state(kv_input, rotary), rotary)

    def project_query(self, hidden_states: torch.Tensor, rotary: torch.Tensor | None) -> torch.Tensor:
        query = self.q_proj(rotate_input(hidden_states, rotary, self.num_heads))
        if self.geometry.scale_query:
            query = query * self.scaling
        return self.split_heads(query)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        state: tuple[torch.Tensor, ...] | None = None,
        state_update: StateUpdate | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rotary = self.rotary_of(position_embeddings)
        query = self.project_query(hidden_states, rotary)
        if state is None:
            kv_input = hidden_states if key_value_states is None else key_value_states
            state = self.kv_state(kv_input, rotary)
            if state_update is not None:
                state = state_update(state)
        output, weights = self.attend(query, state, attention_mask, position_embeddings, rotary, **kwargs)
        output = output.reshape(*hidden_states.shape[:-1], -1)
        return self.out_proj(output), weights

    def stream(
        self,
        hidden_states: torch.Tensor,
        past: tuple[torch.Tensor, ...] | None,
        position_embeddings: torch.Tensor | None,
        chunk_size: int,
        left_chunks: int | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One chunk of chunked self-attention (an encoder streaming): the chunk's queries see
        ``past`` (this variant's state of the left context, as :meth:`kv_state` makes it) and the
        chunk itself. Returns the output and the state to keep: the last ``left_chunks`` chunks of
        ``chunk_size`` frames (all with ``None``), so the cache holds this variant's per-token state
        (MLA: the latent) and never expanded keys and values.

        ``position_embeddings`` covers the keys: relative, the ``Tk+Tq-1`` distances; rotary,
        cos/sin of the key positions (the chunk's queries are the last ``Tq``).
        """
        key_rotary = self.rotary_of(position_embeddings)
        length = hidden_states.shape[1]
        query_rotary = None if key_rotary is None else key_rotary[:, -length:]
        query = self.project_query(hidden_states, query_rotary)
        state = self.kv_state(hidden_states, query_rotary)
        if past is not None:
            state = tuple(torch.cat([old, new], dim=2) for old, new in zip(past, state, strict=True))
        output, _ = self.attend(query, state, None, position_embeddings, key_rotary)
        output = self.out_proj(output.reshape(*hidden_states.shape[:-1], -1))
        if left_chunks is not None:
            keep = left_chunks * chunk_size
            state = tuple(tensor[:, :, tensor.shape[2] - min(keep, tensor.shape[2]) :] for tensor in state)
        return output, state

    def content_query_and_bias(
        self, query: torch.Tensor, key_length: int, position_embeddings: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Relative mode: the content query ``q + u`` and the position term (b+d); else ``(q, None)``."""
        if self.position_mode != "relative":
            return query, None
        position_bias = relative_position_scores(
            query, position_embeddings, self.pos_proj, self.pos_bias_v, key_length, self.scaling
        )
        return query + self.pos_bias_u[None, :, None, :], position_bias

    def attend(
        self,
        query: torch.Tensor,
        state: tuple[torch.Tensor, ...],
        attention_mask: torch.Tensor | None,
        position_embeddings: torch.Tensor | None,
        rotary: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Softmax attention over the keys/values rebuilt from ``state``; ``[B, T, H, d]`` out."""
        key, value = self.expand_state(state, rotary)
        query, position_bias = self.content_query_and_bias(query, key.shape[2], position_embeddings)
        return self.softmax_attention(query, key, value, attention_mask, position_bias, **kwargs)

    @property
    def attention_implementation(self) -> str:
        return getattr(self.config, "_attn_implementation", None) or "eager"

    def softmax_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_bias: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel the config asks for (eager, SDPA, ...) on ``[B, H, Tq, d]`` queries and
        ``[B, H_kv, Tk, d]`` keys/values; grouped heads go to the kernels here, never repeated."""
        implementation = self.attention_implementation
        if implementation == "eager":
            attention = eager_attention
        elif implementation == "sdpa" and key.shape[1] != query.shape[1]:
            attention = grouped_sdpa_attention
        else:
            attention = ALL_ATTENTION_FUNCTIONS[implementation]
        if position_bias is not None and attention not in (eager_attention, grouped_sdpa_attention):
            # kernels such as SDPA take no score bias: the relative-position term joins the mask
            attention_mask, position_bias = with_score_bias(attention_mask, position_bias), None
        kwargs.pop("output_attentions", None)
        return attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=1.0 if self.geometry.scale_query else self.scaling,
            position_bias=position_bias,
            **kwargs,
        )

    def causal_mask(self, query_length: int, key_length: int, device) -> torch.Tensor | None:
        """``[1, 1, Tq, Tk]`` bool (True = may attend) for a causal module; ``None`` otherwise."""
        if not self.is_causal:
            return None
        allowed = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
        return allowed.tril(key_length - query_length)[None, None]

    def attention_weights(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention probabilities ``[B, H, Tq, Tk]`` for one unpadded sequence (causal if the
        module is): what attention transfer teaches a linear attention to imitate."""
        rotary = self.rotary_of(position_embeddings)
        query = self.project_query(hidden_states, rotary)
        kv_input = hidden_states if key_value_states is None else key_value_states
        key, value = self.expand_state(self.kv_state(kv_input, rotary), rotary)
        query, position_bias = self.content_query_and_bias(query, key.shape[2], position_embeddings)
        mask = self.causal_mask(query.shape[2], key.shape[2], query.device)
        scaling = 1.0 if self.geometry.scale_query else self.scaling
        return eager_attention(self, query, key, value, mask, scaling=scaling, position_bias=position_bias)[1]
