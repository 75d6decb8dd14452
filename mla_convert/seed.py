"""Seeding a freshly built attention variant from the trained weights it replaces."""

from __future__ import annotations

import torch
from torch import nn

from .hosts.base import AttentionWeights
from .init.grouping import mean_pool_heads
from .init.svd import input_subspace, low_rank_factors
from .modeling.attention_base import ConvertedAttention
from .modeling.attention_gqa import GroupedQueryAttention
from .modeling.attention_linear import LinearAttention
from .modeling.attention_mla import MultiHeadLatentAttention


def _assign(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.copy_(weight)
    if linear.bias is not None:
        if bias is None:
            linear.bias.zero_()
        else:
            linear.bias.copy_(bias)


@torch.no_grad()
def seed_attention(attention: ConvertedAttention, weights: AttentionWeights) -> None:
    """Copy the shared query/output/position weights, then seed the variant's K/V path."""
    _assign(attention.q_proj, weights.q_weight, weights.q_bias)
    _assign(attention.out_proj, weights.o_weight, weights.o_bias)
    if attention.position_mode == "relative":
        attention.pos_proj.weight.copy_(weights.pos_weight)
        attention.pos_bias_u.copy_(weights.pos_bias_u)
        attention.pos_bias_v.copy_(weights.pos_bias_v)
    if isinstance(attention, MultiHeadLatentAttention):
        _seed_latent(attention, weights)
    elif isinstance(attention, GroupedQueryAttention):
        heads, kv_heads = attention.num_heads, attention.kv_heads
        _assign(attention.k_proj, *mean_pool_heads(weights.k_weight, weights.k_bias, heads, kv_heads))
        _assign(attention.v_proj, *mean_pool_heads(weights.v_weight, weights.v_bias, heads, kv_heads))
    elif isinstance(attention, LinearAttention):
        _assign(attention.k_proj, weights.k_weight, weights.k_bias)
        _assign(attention.v_proj, weights.v_weight, weights.v_bias)
    else:
        raise TypeError(f"no seeding rule for {type(attention).__name__}")


def _seed_latent(attention: MultiHeadLatentAttention, weights: AttentionWeights) -> None:
    """Joint: one SVD of ``[W_k; W_v]``; split: one SVD each, ``latent_dim/2`` apiece.

    In rotary mode the key half of the latent must map back to the layer input (the rotation
    comes before the trained key projection), so its down-projection is an orthonormal basis of
    the most important input directions and ``k_up`` is that basis transposed.
    """
    w_k, w_v = weights.k_weight, weights.v_weight
    rank = attention.latent_dim
    rotary = attention.position_mode == "rotary"
    if attention.latent_layout == "joint":
        if rotary:
            basis = input_subspace(torch.cat([w_k, w_v]), rank)
            down, k_up, v_up = basis.T, basis, w_v.to(torch.float64) @ basis
        else:
            up, down = low_rank_factors(torch.cat([w_k, w_v]), rank)
            k_up, v_up = up[: w_k.shape[0]], up[w_k.shape[0] :]
    else:
        half = rank // 2
        if rotary:
            basis = input_subspace(w_k, half)
            k_up, k_down = basis, basis.T
        else:
            k_up, k_down = low_rank_factors(w_k, half)
        v_up, v_down = low_rank_factors(w_v, half)
        down = torch.cat([k_down, v_down])
    attention.kv_down.weight.copy_(down)
    _assign(attention.v_up, v_up, weights.v_bias)
    if rotary:
        _assign(attention.k_up, k_up)
        _assign(attention.k_proj, w_k, weights.k_bias)
    else:
        _assign(attention.k_up, k_up, weights.k_bias)


@torch.no_grad()
def effective_kv_weights(attention: ConvertedAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear maps ``x ↦ K``, ``x ↦ V`` the module implements (positions off), ``[H*d, n]``.

    Probing with the identity works for every variant, so errors are measured the same way for
    MLA, GQA and linear attention without variant-specific algebra.
    """
    hidden = attention.geometry.hidden_size
    probe = torch.cat([torch.zeros(1, hidden), torch.eye(hidden)]).to(attention.q_proj.weight)[None]
    keys, values = attention.expand_state(attention.kv_state(probe, None), None)
    maps = []
    for states in (keys, values):
        states = states.repeat_interleave(attention.num_heads // states.shape[1], dim=1)
        states = states.transpose(1, 2).reshape(hidden + 1, -1)  # [1 + n, H*d]
        maps.append((states[1:] - states[:1]).T)
    return maps[0], maps[1]
