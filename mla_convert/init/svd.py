"""Truncated SVD factorisations used to seed latent (MLA) projections.

The SVD of a ``m × n`` matrix is taken through the eigendecomposition of its ``n × n`` Gram
matrix (accumulated in float64, decomposed in float32): several times faster than
``torch.linalg.svd`` of the tall stacked ``[W_k; W_v]``, which is what lets converting a 0.6B model
cost about as much as saving it. Full rank stays exact because the eigenvectors are orthonormal,
whatever the precision of the eigenvalues; the leading subspace, the only one a truncation keeps,
is well separated and accurate in float32.
"""

from __future__ import annotations

import torch


def right_singular_vectors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular values ``[r]`` and right singular vectors ``[n, r]`` (float64)."""
    weight = weight.to(torch.float64)
    gram = weight.T @ weight
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.to(torch.float32))
    order = torch.argsort(eigenvalues, descending=True)[:rank]
    singular_values = eigenvalues[order].to(torch.float64).clamp_min(0).sqrt()
    return singular_values, eigenvectors[:, order].to(torch.float64)


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [m, r], down [r, n])`` with ``up @ down`` the best rank-``r`` approximation of ``weight``.

    The singular values are split evenly (``up = U√Σ``, ``down = √Σ Vᵀ``) so neither factor carries
    all the scale, which keeps both well conditioned for fine-tuning. Float64 results.
    """
    singular_values, basis = right_singular_vectors(weight, rank)
    floor = singular_values.max().clamp_min(1e-300) * 1e-12
    root = singular_values.clamp_min(floor).sqrt()
    down = root[:, None] * basis.T
    up = (weight.to(torch.float64) @ basis) / root[None, :]
    return up, down


def input_subspace(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal ``[n, r]`` basis of the input directions ``weight`` is most sensitive to."""
    return right_singular_vectors(weight, rank)[1]


def relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖approximation − reference‖_F / ‖reference‖_F`` (0 when both are zero)."""
    reference = reference.to(torch.float64)
    denominator = reference.norm()
    numerator = (approximation.to(torch.float64) - reference).norm()
    return float(numerator / denominator) if denominator > 0 else float(numerator)
