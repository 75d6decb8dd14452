"""Seeding a freshly built attention variant from the trained weights it replaces.

One seeder per spec type, looked up in :data:`SEEDERS` (torchao's handler-table style): a new
attention variant registers its own with :func:`register_seeder` and nothing else here changes.
A seeder copies the weights the variant shares with multi-head attention (:func:`copy_shared`) and
seeds its K/V path; it returns the weights the module reproduces at full rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..calibration import SiteStatistics
from ..hosts.base import AttentionWeights
from ..modeling.attention_base import ConvertedAttention
from ..modeling.attention_gqa import GroupedQueryAttention
from ..modeling.attention_linear import LinearAttention
from ..modeling.attention_mla import MultiHeadLatentAttention
from ..specs import SPEC_CLASSES, AttentionSpec, GQASpec, LinearSpec, MLASpec
from .grouping import (
    aligned_merge,
    augmented,
    balanced_groups,
    head_similarity,
    mean_pool_heads,
    weighted_merge,
)
from .svd import input_subspace, low_rank_factors
from .whitening import balance_factor, whitened_svd, whitening_factor

Seeder = Callable[
    [ConvertedAttention, AttentionWeights, "AttentionSpec | None", "SiteStatistics | None"], AttentionWeights
]
SEEDERS: dict[type, Seeder] = {}


def register_seeder(spec_type: type) -> Callable[[Seeder], Seeder]:
    """Register the seeder of the layers a ``spec_type`` spec builds."""

    def register(seeder: Seeder) -> Seeder:
        SEEDERS[spec_type] = seeder
        return seeder

    return register


def _assign(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.copy_(weight)
    if linear.bias is not None:
        if bias is None:
            linear.bias.zero_()
        else:
            linear.bias.copy_(bias)


@torch.no_grad()
def seed_attention(
    attention: ConvertedAttention,
    weights: AttentionWeights,
    spec: AttentionSpec | None = None,
    statistics: SiteStatistics | None = None,
) -> AttentionWeights:
    """Seed ``attention`` from the trained ``weights`` by the seeder of ``spec``'s type (without a
    spec: the uncalibrated seeder of the module's variant).

    Calibrated inits (``spec.needs_calibration``) need the site's input ``statistics``. Returns
    the weights the module now reproduces at full rank: the input ``weights``, with the heads
    renumbered when a calibrated GQA regrouped them (errors must be measured against those).
    """
    if spec is not None and spec.needs_calibration and statistics is None:
        raise ValueError("a calibrated init needs calibration statistics")
    spec_type = type(spec) if spec is not None else SPEC_CLASSES.get(attention.variant)
    if spec_type not in SEEDERS:
        raise TypeError(f"no seeder registered for {getattr(spec_type, '__name__', spec_type)}")
    return SEEDERS[spec_type](attention, weights, spec, statistics)


def copy_shared(attention: ConvertedAttention, weights: AttentionWeights) -> None:
    """The query, output and position weights every variant keeps from multi-head attention."""
    _assign(attention.q_proj, weights.q_weight, weights.q_bias)
    _assign(attention.out_proj, weights.o_weight, weights.o_bias)
    if attention.position_mode == "relative":
        attention.pos_proj.weight.copy_(weights.pos_weight)
        attention.pos_bias_u.copy_(weights.pos_bias_u)
        attention.pos_bias_v.copy_(weights.pos_bias_v)


def _calibrated(spec: AttentionSpec | None) -> bool:
    return spec is not None and spec.needs_calibration


@register_seeder(MLASpec)
def seed_mla(
    attention: MultiHeadLatentAttention,
    weights: AttentionWeights,
    spec: MLASpec | None,
    statistics: SiteStatistics | None,
) -> AttentionWeights:
    """Plain: truncated SVD of the trained K/V weights; calibrated: the whitened SVD below."""
    copy_shared(attention, weights)
    if _calibrated(spec):
        _seed_calibrated_latent(attention, weights, statistics, spec)
    else:
        _seed_latent(attention, weights)
    return weights


@register_seeder(GQASpec)
def seed_gqa(
    attention: GroupedQueryAttention,
    weights: AttentionWeights,
    spec: GQASpec | None,
    statistics: SiteStatistics | None,
) -> AttentionWeights:
    """Mean-pool: contiguous groups of heads averaged; calibrated: heads regrouped and merged on
    the calibration inputs (which renumbers them: the returned weights say how)."""
    if _calibrated(spec):
        weights = _seed_calibrated_groups(attention, weights, statistics)
        copy_shared(attention, weights)
        return weights
    copy_shared(attention, weights)
    heads, kv_heads = attention.num_heads, attention.kv_heads
    _assign(attention.k_proj, *mean_pool_heads(weights.k_weight, weights.k_bias, heads, kv_heads))
    _assign(attention.v_proj, *mean_pool_heads(weights.v_weight, weights.v_bias, heads, kv_heads))
    return weights


@register_seeder(LinearSpec)
def seed_linear(
    attention: LinearAttention,
    weights: AttentionWeights,
    spec: LinearSpec | None,
    statistics: SiteStatistics | None,
) -> AttentionWeights:
    """The trained projections copied; a learnable (hedgehog) feature map starts at the identity
    (attention transfer trains it afterwards, see :mod:`.attention_transfer`)."""
    copy_shared(attention, weights)
    _assign(attention.k_proj, weights.k_weight, weights.k_bias)
    _assign(attention.v_proj, weights.v_weight, weights.v_bias)
    if attention.feature_map == "hedgehog":
        attention.feature_weight.copy_(torch.eye(attention.head_dim).expand_as(attention.feature_weight))
    return weights


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


def _joint_weight(
    weights: AttentionWeights, spec: MLASpec, covariance: torch.Tensor | None, statistics: SiteStatistics | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weighted, plain)``: the stacked ``[W_k; W_v]`` whose whitened spectrum picks the latent,
    and the plain stack the up-projections are read from (``up = [W_k; W_v] S V_r``).

    ``objective="kv"`` weighs the two by one factor ``α`` (``balance_kv``: equal energy on the
    calibration inputs). ``objective="attention"`` (calibrated, not rotary) weighs each key head
    by the queries that read it (``E[q_h q_hᵀ]``: the error that reaches the attention scores) and
    each value head by its slice of the output projection (``O_hᵀ O_h``: the error that reaches the
    layer output), then balances the two.
    """
    plain = torch.cat([weights.k_weight.to(torch.float64), weights.v_weight.to(torch.float64)])
    keys, values = plain[: weights.k_weight.shape[0]], plain[weights.k_weight.shape[0] :]
    attention_aware = (
        spec.objective == "attention"
        and covariance is not None
        and statistics is not None
        and weights.position_mode != "rotary"
    )
    if attention_aware:
        key_rows, value_rows = _head_metric_roots(weights, statistics)
        keys = torch.block_diag(*key_rows) @ keys
        values = torch.block_diag(*value_rows) @ values
    alpha = 1.0
    if spec.balance_kv and covariance is not None:
        alpha = balance_factor(keys, values, whitening_factor(covariance, spec.damping))
    return torch.cat([alpha * keys, values]), plain


def _head_metric_roots(weights: AttentionWeights, statistics: SiteStatistics) -> tuple[list, list]:
    """Per head ``L_hᵀ`` with ``L_h L_hᵀ = E[q_h q_hᵀ]`` (keys) and ``P_hᵀ`` with ``P_h P_hᵀ = O_hᵀ O_h`` (values)."""
    heads, head_dim = weights.geometry.num_heads, weights.geometry.head_dim
    query_bias = _opt_double(weights.q_bias)
    if weights.position_mode == "relative":
        content = weights.pos_bias_u.double().reshape(-1)
        query_bias = content if query_bias is None else query_bias + content
    queries = augmented(weights.q_weight.double(), query_bias, heads)
    key_metrics = torch.einsum("hdn,nm,hem->hde", queries, _augmented_moment(statistics.query), queries)
    output = weights.o_weight.double().reshape(-1, heads, head_dim).permute(1, 2, 0)  # [H, d, hidden]
    value_metrics = output @ output.transpose(1, 2)
    return [_metric_root(m).T for m in key_metrics], [_metric_root(m).T for m in value_metrics]


def _metric_root(metric: torch.Tensor) -> torch.Tensor:
    jitter = 1e-9 * metric.diagonal().mean().clamp_min(1e-30)
    return torch.linalg.cholesky_ex(metric + jitter * torch.eye(metric.shape[0], dtype=metric.dtype))[0]


def latent_spectrum(weights: AttentionWeights, spec: MLASpec, statistics: SiteStatistics | None) -> torch.Tensor:
    """Singular values a joint latent keeps or drops: of ``W S`` when calibrated, else of ``W``."""
    covariance = statistics.key_value.second_moment if spec.needs_calibration else None
    joint, _ = _joint_weight(weights, spec, covariance, statistics)
    if covariance is None:
        return torch.linalg.svdvals(joint)
    return whitened_svd(joint, covariance, spec.damping)[1]


def _seed_calibrated_latent(
    attention: MultiHeadLatentAttention, weights: AttentionWeights, statistics: SiteStatistics, spec: MLASpec
) -> None:
    """Whitened joint SVD: minimises the K/V error on the calibration inputs, not on the weights.

    Rotary: the latent must map back to the layer input, so ``k_up = S V_r`` and
    ``down = V_rᵀ S⁻¹`` (an oblique projector that keeps what the calibration inputs use).
    """
    covariance = statistics.key_value.second_moment
    joint, plain = _joint_weight(weights, spec, covariance, statistics)
    rank, hidden = attention.latent_dim, weights.k_weight.shape[0]
    if attention.position_mode == "rotary":
        _, _, right_t, factor = whitened_svd(joint, covariance, spec.damping)
        basis = factor @ right_t[:rank].T
        down = torch.linalg.solve_triangular(factor, right_t[:rank], upper=False, left=False)
        attention.kv_down.weight.copy_(down)
        _assign(attention.k_up, basis)
        _assign(attention.k_proj, weights.k_weight, weights.k_bias)
        _assign(attention.v_up, weights.v_weight.to(torch.float64) @ basis, weights.v_bias)
        return
    _, _, right_t, factor = whitened_svd(joint, covariance, spec.damping)
    # down = V_rᵀ S⁻¹ (solving down · S = V_rᵀ); each head's best up-projection for that subspace is
    # its own projection W S V_r, whatever weighting chose the subspace
    down = torch.linalg.solve_triangular(factor, right_t[:rank], upper=False, left=False)
    up = plain @ factor @ right_t[:rank].T
    attention.kv_down.weight.copy_(down)
    _assign(attention.k_up, up[:hidden], weights.k_bias)
    _assign(attention.v_up, up[hidden:], weights.v_bias)


def _augmented_moment(moments) -> torch.Tensor:
    """``E[x̃ x̃ᵀ]`` for ``x̃ = [x; 1]``."""
    second, mean = moments.second_moment, moments.mean
    top = torch.cat([second, mean[:, None]], dim=1)
    bottom = torch.cat([mean, torch.ones(1, dtype=mean.dtype)])[None]
    return torch.cat([top, bottom])


def _permute_heads(weights: AttentionWeights, order: list[int]) -> AttentionWeights:
    """The same attention with its heads renumbered (query, key, value, position and output sides)."""
    heads = weights.geometry.num_heads
    head_dim = weights.geometry.head_dim
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in order])

    def by_rows(tensor):
        return None if tensor is None else tensor[rows]

    def by_heads(tensor):
        return None if tensor is None else tensor.reshape(heads, head_dim)[order]

    return replace(
        weights,
        q_weight=weights.q_weight[rows],
        q_bias=by_rows(weights.q_bias),
        k_weight=weights.k_weight[rows],
        k_bias=by_rows(weights.k_bias),
        v_weight=weights.v_weight[rows],
        v_bias=by_rows(weights.v_bias),
        o_weight=weights.o_weight[:, rows],
        pos_weight=by_rows(weights.pos_weight),
        pos_bias_u=by_heads(weights.pos_bias_u),
        pos_bias_v=by_heads(weights.pos_bias_v),
    )


def _seed_calibrated_groups(
    attention: GroupedQueryAttention, weights: AttentionWeights, statistics: SiteStatistics
) -> AttentionWeights:
    """Group heads by how alike their keys and values are on calibration inputs, renumber the query
    heads so each group is contiguous, and merge each group's K and V projections by weighted least
    squares (keys weighted by the queries that read them, values by the output projection).
    Returns the renumbered weights for the shared query/output copy."""
    heads, kv_heads, head_dim = attention.num_heads, attention.kv_heads, attention.head_dim
    kv_moment = _augmented_moment(statistics.key_value)
    query_moment = _augmented_moment(statistics.query)
    keys = augmented(weights.k_weight.double(), _opt_double(weights.k_bias), heads)
    values = augmented(weights.v_weight.double(), _opt_double(weights.v_bias), heads)
    similarity = (head_similarity(keys, kv_moment) + head_similarity(values, kv_moment)) / 2
    groups = balanced_groups(similarity, kv_heads)
    weights = _permute_heads(weights, [head for group in groups for head in group])
    keys = augmented(weights.k_weight.double(), _opt_double(weights.k_bias), heads)
    values = augmented(weights.v_weight.double(), _opt_double(weights.v_bias), heads)
    query_bias = _opt_double(weights.q_bias)
    if attention.position_mode == "relative":
        content = weights.pos_bias_u.double().reshape(-1)
        query_bias = content if query_bias is None else query_bias + content
    queries = augmented(weights.q_weight.double(), query_bias, heads)
    key_metrics = torch.einsum("hdn,nm,hem->hde", queries, query_moment, queries)
    output = weights.o_weight.double().reshape(-1, heads, head_dim).permute(1, 2, 0)  # [H, d, hidden]
    value_metrics = output @ output.transpose(1, 2)
    size = heads // kv_heads
    if attention.position_mode == "none":
        return _seed_aligned_groups(attention, weights, queries, keys, values, key_metrics, value_metrics, statistics)
    merged_keys, merged_values = [], []
    for group in range(kv_heads):
        members = slice(group * size, (group + 1) * size)
        merged_keys.append(weighted_merge(keys[members], key_metrics[members]))
        merged_values.append(weighted_merge(values[members], value_metrics[members]))
    merged_k, merged_v = torch.cat(merged_keys), torch.cat(merged_values)
    _assign(attention.k_proj, merged_k[:, :-1], merged_k[:, -1])
    _assign(attention.v_proj, merged_v[:, :-1], merged_v[:, -1])
    return weights


def _seed_aligned_groups(
    attention: GroupedQueryAttention,
    weights: AttentionWeights,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_metrics: torch.Tensor,
    value_metrics: torch.Tensor,
    statistics: SiteStatistics,
) -> AttentionWeights:
    """Without positions inside the attention (Whisper), each query head can absorb a ``d×d`` map
    and each output slice another: a group then shares a key/value *subspace* fitted on the
    calibration inputs (:func:`aligned_merge`), and every head reads its own coordinates in it.
    (Relative and rotary positions act on the query or key after projection, so they keep the
    plain weighted merge.)"""
    heads, kv_heads, head_dim = attention.num_heads, attention.kv_heads, attention.head_dim
    factor = whitening_factor(_augmented_moment(statistics.key_value), 1e-6)
    size = heads // kv_heads
    shared_k, shared_v, new_queries, output_maps = [], [], [], []
    for group in range(kv_heads):
        members = slice(group * size, (group + 1) * size)
        key, key_maps = aligned_merge(keys[members], key_metrics[members], factor)
        value, value_maps = aligned_merge(values[members], value_metrics[members], factor)
        shared_k.append(key)
        shared_v.append(value)
        new_queries.append(key_maps.transpose(1, 2) @ queries[members])  # B_hᵀ [W_qh | b_qh]
        output_maps.append(value_maps)
    merged_k, merged_v = torch.cat(shared_k), torch.cat(shared_v)
    _assign(attention.k_proj, merged_k[:, :-1], merged_k[:, -1])
    _assign(attention.v_proj, merged_v[:, :-1], merged_v[:, -1])
    query = torch.cat(new_queries).reshape(heads * head_dim, -1)
    output = weights.o_weight.double().reshape(-1, heads, head_dim)  # [hidden, H, d]
    output = torch.einsum("nhd,hde->nhe", output, torch.cat(output_maps)).reshape(-1, heads * head_dim)
    dtype = weights.q_weight.dtype
    return replace(
        weights,
        q_weight=query[:, :-1].to(dtype),
        q_bias=None if weights.q_bias is None else query[:, -1].to(dtype),
        o_weight=output.to(dtype),
    )


def _opt_double(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.double()


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
