"""Head grouping for GQA seeds: neighbour mean-pooling, or calibrated grouping and merging."""

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


def augmented(weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """``[H, d, n+1]``: each head's ``[W_h | b_h]``, so an affine map is one matrix."""
    rows, columns = weight.shape
    bias = torch.zeros(rows, dtype=weight.dtype) if bias is None else bias
    return torch.cat([weight, bias[:, None]], dim=1).reshape(num_heads, rows // num_heads, columns + 1)


def head_similarity(heads: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """``[H, H]`` cosine similarity of the heads' outputs over the calibration inputs.

    ``heads`` is ``[H, d, n+1]`` (augmented), ``second_moment`` the ``(n+1)×(n+1)`` moment of the
    inputs with a trailing 1: ``E[⟨k_i, k_j⟩] = tr(A_i M A_jᵀ)``.
    """
    cross = torch.einsum("idn,nm,jdm->ij", heads, second_moment, heads)
    norms = cross.diagonal().clamp_min(1e-30).sqrt()
    return cross / (norms[:, None] * norms[None, :])


def balanced_groups(similarity: torch.Tensor, kv_heads: int) -> list[list[int]]:
    """Partition heads into ``kv_heads`` groups of equal size, most similar heads together.

    Greedy: the unassigned head least similar to everything else seeds a group, which takes the
    heads most similar to the group so far. Equal sizes keep the standard GQA layout (the query
    heads are permuted so that each group is contiguous).
    """
    num_heads = similarity.shape[0]
    size = num_heads // kv_heads
    unassigned = list(range(num_heads))
    groups = []
    while unassigned:
        pool = similarity[unassigned][:, unassigned]
        seed = unassigned[int(pool.sum(dim=1).argmin())]
        group = [seed]
        unassigned.remove(seed)
        while len(group) < size:
            scores = similarity[unassigned][:, group].mean(dim=1)
            best = unassigned[int(scores.argmax())]
            group.append(best)
            unassigned.remove(best)
        groups.append(sorted(group))
    return sorted(groups)


def weighted_merge(heads: torch.Tensor, metrics: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """The shared ``[d, n+1]`` map minimising ``Σ_h E‖M_h^{1/2} (A_h − A) x‖²``: ``(Σ M_h)⁻¹ Σ M_h A_h``.

    For keys ``M_h = E[q_h q_hᵀ]`` (what query head ``h`` multiplies its key with), so the merged
    key preserves the attention scores; for values ``M_h = O_hᵀ O_h`` (head ``h``'s slice of the
    output projection), so it preserves the attention output. The input covariance cancels out.
    Directions no query of the calibration data used are left at the plain mean (a ridge toward
    it), which also makes a one-head group exactly that head.
    """
    dim = heads.shape[1]
    total = metrics.sum(dim=0)
    strength = ridge * total.diagonal().mean().clamp_min(1e-30)
    identity = torch.eye(dim, dtype=total.dtype)
    target = torch.einsum("hde,hen->dn", metrics, heads) + strength * heads.mean(dim=0)
    return torch.linalg.solve(total + strength * identity, target)


def aligned_merge(
    heads: torch.Tensor, metrics: torch.Tensor, factor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared ``[d, n+1]`` map ``A`` and per-head ``[d, d]`` maps ``B_h`` with ``A_h ≈ B_h A``.

    Where the reading side can absorb a ``d×d`` map per head (queries for keys: ``q_hᵀ B_h k`` =
    ``(B_hᵀ q_h)ᵀ k``; the output projection for values: ``O_h B_h v``), the group does not have to
    agree on one key: it has to share one ``d``-dimensional *subspace* of the inputs, and each head
    reads its own coordinates in it. The best subspace minimises ``Σ_h E‖M_h^{1/2}(A_h − B_h A)x‖²``
    on the calibration inputs (``E[x xᵀ] = S Sᵀ``, ``factor = S``): the top ``d`` right singular
    vectors ``V_d`` of the stacked ``L_hᵀ A_h S`` (``M_h = L_h L_hᵀ``), giving ``A = V_dᵀ S⁻¹`` and
    ``B_h = A_h S V_d``. A one-head group is reproduced exactly.
    """
    count, dim, _ = heads.shape
    roots = torch.linalg.cholesky_ex(metrics + 1e-9 * metrics.diagonal(dim1=1, dim2=2).mean() * torch.eye(dim))[0]
    whitened = heads @ factor  # [m, d, n+1]
    stacked = (roots.transpose(1, 2) @ whitened).reshape(count * dim, -1)
    basis = torch.linalg.svd(stacked, full_matrices=False)[2][:dim].T  # [n+1, d]
    shared = torch.linalg.solve_triangular(factor.T, basis, upper=True).T  # V_dᵀ S⁻¹
    return shared, whitened @ basis
