"""Activation-aware (calibrated) low-rank factorisation: minimise the error on real inputs.

Plain SVD minimises ``‖W − W'‖_F``, as if every input direction were equally likely. What the
model feels is ``‖(W − W')X‖_F`` over the inputs ``X`` that actually occur (SVD-LLM, Palu,
TransMLA's activation PCA). With ``C = E[x xᵀ] = S Sᵀ`` (Cholesky, with damping for directions
the calibration never saw), ``‖(W − W')X‖² = ‖(W − W')S‖²``, so the best rank-``r`` ``W'`` comes
from the SVD of ``W S = U Σ Vᵀ``: ``W' = (U_r Σ_r)(V_rᵀ S⁻¹)``, i.e. ``up = U_r Σ_r`` and
``down = V_rᵀ S⁻¹``. With ``C = I`` this is exactly the plain truncated SVD.
"""

from __future__ import annotations

import torch


def whitening_factor(covariance: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
    """Lower-triangular ``S`` with ``S Sᵀ = C + λ·mean(diag C)·I`` (float64).

    The damping keeps ``S`` invertible when calibration never excites some input directions;
    relative to the mean variance, so it means the same thing for every layer.
    """
    covariance = covariance.to(torch.float64)
    covariance = 0.5 * (covariance + covariance.T)
    size = covariance.shape[0]
    scale = covariance.diagonal().mean().clamp_min(1e-12)
    identity = torch.eye(size, dtype=torch.float64, device=covariance.device)
    jitter = damping
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(covariance + jitter * scale * identity)
        if int(info) == 0:
            return factor
        jitter = max(jitter * 10, 1e-8)
    raise ValueError("the calibration covariance is not positive definite even with strong damping")


def whitened_svd(
    weight: torch.Tensor, covariance: torch.Tensor, damping: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, Σ, Vᵀ, S)`` of ``W S`` (float64): the spectrum a calibrated truncation keeps or drops."""
    factor = whitening_factor(covariance, damping)
    left, singular_values, right_t = torch.linalg.svd(weight.to(torch.float64) @ factor, full_matrices=False)
    return left, singular_values, right_t, factor


def calibrated_low_rank_factors(
    weight: torch.Tensor, covariance: torch.Tensor, rank: int, damping: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [m, r], down [r, n])`` minimising ``‖(W − up·down) X‖_F`` for inputs with covariance C."""
    left, singular_values, right_t, factor = whitened_svd(weight, covariance, damping)
    up = left[:, :rank] * singular_values[:rank]
    # down = V_rᵀ S⁻¹, computed as the solution of down · S = V_rᵀ (S is triangular)
    down = torch.linalg.solve_triangular(factor, right_t[:rank], upper=False, left=False)
    return up, down


def balance_factor(w_k: torch.Tensor, w_v: torch.Tensor, factor: torch.Tensor) -> float:
    """``α`` with ``‖α W_k S‖ = ‖W_v S‖``: stacking ``[α W_k; W_v]`` lets K and V share the latent
    on equal terms instead of the one with the larger activations taking all the rank."""
    k_energy = (w_k.to(torch.float64) @ factor).norm()
    v_energy = (w_v.to(torch.float64) @ factor).norm()
    return float(v_energy / k_energy) if k_energy > 0 else 1.0
