"""Calibrated (activation-aware) factorisation and budget allocation, on synthetic data."""

from __future__ import annotations

import pytest
import torch

from mla_convert.init.budget import allocate_measured, allocate_ranks, candidate_ranks, predicted_error
from mla_convert.init.svd import low_rank_factors
from mla_convert.init.whitening import calibrated_low_rank_factors, whitened_svd


def test_identity_covariance_gives_the_plain_truncated_svd():
    torch.manual_seed(0)
    weight = torch.randn(48, 32, dtype=torch.float64)
    for rank in (4, 16, 32):
        up, down = calibrated_low_rank_factors(weight, torch.eye(32), rank, damping=0.0)
        plain_up, plain_down = low_rank_factors(weight, rank)
        assert torch.allclose(up @ down, plain_up @ plain_down, atol=1e-5)


def test_whitening_recovers_the_exact_subspace_of_low_rank_activations():
    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(32, 5, dtype=torch.float64)).Q  # activations live in 5 dims
    activations = basis @ torch.randn(5, 2000, dtype=torch.float64)
    covariance = activations @ activations.T / activations.shape[1]
    weight = torch.randn(48, 32, dtype=torch.float64)
    up, down = calibrated_low_rank_factors(weight, covariance, rank=5, damping=1e-9)
    error = ((weight - up @ down) @ activations).norm() / (weight @ activations).norm()
    assert error < 1e-6
    plain_up, plain_down = low_rank_factors(weight, 5)
    plain_error = ((weight - plain_up @ plain_down) @ activations).norm() / (weight @ activations).norm()
    assert plain_error > 0.3
    spectrum = whitened_svd(weight, covariance, damping=1e-9)[1]
    assert predicted_error(spectrum, 5) < 1e-9


def test_calibrated_error_never_exceeds_plain_svd_on_the_calibration_inputs():
    torch.manual_seed(2)
    mixing = torch.randn(32, 32, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)
    activations = mixing @ torch.randn(32, 4000, dtype=torch.float64)
    covariance = activations @ activations.T / activations.shape[1]
    weight = torch.randn(64, 32, dtype=torch.float64)
    for rank in (2, 8, 16):
        up, down = calibrated_low_rank_factors(weight, covariance, rank, damping=1e-10)
        plain_up, plain_down = low_rank_factors(weight, rank)
        calibrated = ((weight - up @ down) @ activations).norm()
        plain = ((weight - plain_up @ plain_down) @ activations).norm()
        assert calibrated <= plain * (1 + 1e-9)


@pytest.mark.parametrize("budget", [4, 10, 37, 64])
def test_budget_allocation_spends_exactly_the_budget(budget):
    torch.manual_seed(3)
    spectra = [torch.rand(16).sort(descending=True).values * scale for scale in (1.0, 3.0, 0.5, 2.0)]
    ranks = allocate_ranks(spectra, budget)
    assert sum(ranks) == budget and all(1 <= rank <= 16 for rank in ranks)


def test_budget_goes_where_the_spectrum_is_flat():
    flat = torch.ones(16)
    steep = torch.tensor([10.0] + [0.01] * 15)
    ranks = allocate_ranks([steep, flat], budget=12)
    assert ranks[1] > ranks[0]
    brute = min((predicted_error(steep, r) + predicted_error(flat, 12 - r), r) for r in range(1, 12))
    assert ranks[0] == brute[1]


def test_impossible_budgets_are_refused():
    with pytest.raises(ValueError):
        allocate_ranks([torch.ones(4), torch.ones(4)], budget=1)
    with pytest.raises(ValueError):
        allocate_ranks([torch.ones(4), torch.ones(4)], budget=9)


def test_weighted_merge_keeps_a_lone_head_and_averages_equally_weighted_heads():
    from mla_convert.init.grouping import weighted_merge

    torch.manual_seed(4)
    heads = torch.randn(2, 8, 13, dtype=torch.float64)
    low_rank = torch.randn(8, 3, dtype=torch.float64)
    singular = (low_rank @ low_rank.T)[None]  # a query that only ever used 3 directions
    assert torch.allclose(weighted_merge(heads[:1], singular), heads[0], atol=1e-9)
    equal = torch.eye(8, dtype=torch.float64).expand(2, 8, 8)
    assert torch.allclose(weighted_merge(heads, equal), heads.mean(dim=0), atol=1e-6)


def test_weighted_merge_preserves_what_the_queries_read():
    """Two heads whose queries read disjoint key directions can share one exact key projection."""
    from mla_convert.init.grouping import weighted_merge

    torch.manual_seed(5)
    heads = torch.randn(2, 4, 6, dtype=torch.float64)
    metrics = torch.zeros(2, 4, 4, dtype=torch.float64)
    metrics[0, :2, :2] = torch.eye(2)
    metrics[1, 2:, 2:] = torch.eye(2)
    merged = weighted_merge(heads, metrics, ridge=1e-9)
    assert torch.allclose(merged[:2], heads[0, :2], atol=1e-6)
    assert torch.allclose(merged[2:], heads[1, 2:], atol=1e-6)


def test_aligned_merge_recovers_heads_that_share_a_subspace_in_different_coordinates():
    from mla_convert.init.grouping import aligned_merge, weighted_merge
    from mla_convert.init.whitening import whitening_factor

    torch.manual_seed(3)
    inputs = torch.cat([torch.randn(2000, 10, dtype=torch.float64), torch.ones(2000, 1, dtype=torch.float64)], 1)
    moment = inputs.T @ inputs / len(inputs)
    common = torch.randn(4, 11, dtype=torch.float64)  # one 4-dim subspace of the (augmented) inputs
    heads = torch.stack([torch.randn(4, 4, dtype=torch.float64) @ common for _ in range(3)])  # own coordinates
    metrics = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    shared, maps = aligned_merge(heads, metrics, whitening_factor(moment, 0.0))
    assert torch.allclose(maps @ shared, heads, atol=1e-9)
    merged = weighted_merge(heads, metrics)  # one map for all: cannot follow three coordinate systems
    assert float((merged - heads).norm() / heads.norm()) > 0.3


def test_measured_allocation_is_the_exact_best_choice_that_spends_the_total():
    import itertools

    generator = torch.Generator().manual_seed(3)
    unit, candidates = candidate_ranks(budget=96, widths=[64, 64, 64, 64])
    assert unit == 12 and candidates[0] == [12, 24, 36, 48, 60]
    errors = [{rank: float(torch.rand((), generator=generator)) / rank for rank in ranks} for ranks in candidates]
    ranks = allocate_measured(errors, total=96)
    best = min(
        (combo for combo in itertools.product(*candidates) if sum(combo) == 96),
        key=lambda combo: sum(e[r] for e, r in zip(errors, combo, strict=True)),
    )
    assert sum(ranks) == 96 and tuple(ranks) == best


def test_a_sensitive_layer_gets_more_of_a_measured_budget():
    candidates = [8, 16, 24]
    flat = {rank: 1.0 / rank for rank in candidates}
    sensitive = {rank: 100.0 / rank for rank in candidates}
    ranks = allocate_measured([flat, sensitive, flat], total=40)
    assert ranks[1] == 24 and sum(ranks) == 40


def test_the_rest_of_a_budget_is_handed_out_on_top_of_chosen_ranks():
    spectra = [torch.linspace(2, 1, 16, dtype=torch.float64), torch.linspace(1, 0.1, 16, dtype=torch.float64)]
    ranks = allocate_ranks(spectra, budget=21, start=[8, 8])
    assert sum(ranks) == 21 and ranks[0] >= 8 and ranks[1] >= 8
