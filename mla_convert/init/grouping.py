"""Head grouping for GQA seeds."""

from __future__ import annotations

import torch


def mean_pool_heads(
    weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average the rows of each contiguous group of ``num_heads // kv_heads`` heads (GQA paper).

    ``weight`` is ``[num_heads * d, n]`` (one block of ``d`` output rows per head); the result is
    ``[kv_heads * d, n]``, group ``g`` serving query heads ``g*G .. g*G+G-1``.
    """
    group = num_heads // kv_heads
    rows, columns = weight.shape
    head_dim = rows // num_heads
    pooled = weight.reshape(kv_heads, group, head_dim, columns).mean(dim=1).reshape(kv_heads * head_dim, columns)
    pooled_bias = None
    if bias is not None:
        pooled_bias = bias.reshape(kv_heads, group, head_dim).mean(dim=1).reshape(kv_heads * head_dim)
    return pooled, pooled_bias
