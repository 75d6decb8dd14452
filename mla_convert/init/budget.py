"""Per-layer latent sizes under a total cache budget.

Two allocators: :func:`allocate_ranks` from the calibrated spectra alone (a prediction of each
layer's K/V error), and :func:`allocate_measured` from errors measured on the model's output, one
per layer and candidate size. The spectra say how much of a layer's K/V a rank keeps, not how much
the model's output cares about that layer, so the measured allocator is the default whenever
held-out calibration audio is there to measure on.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import torch


def allocate_ranks(
    spectra: Sequence[torch.Tensor],
    budget: int,
    minimum: int = 1,
    maximum: Sequence[int] | None = None,
    start: Sequence[int] | None = None,
) -> list[int]:
    """Ranks ``r_l`` with ``Σ r_l == budget`` minimising ``Σ_l e_l(r_l)``.

    ``e_l(r) = Σ_{i>r} σ_{l,i}² / Σ_i σ_{l,i}²`` is layer ``l``'s predicted relative squared error
    on the calibration activations when its latent keeps ``r`` directions. Each extra rank of a
    layer saves ``σ²_{l,r+1} / Σσ²``, and those savings only shrink as ``r`` grows, so handing out
    the budget one rank at a time to the layer that saves most is optimal. ``start`` hands out
    the rest of a budget on top of ranks already chosen.
    """
    count = len(spectra)
    maximum = list(maximum) if maximum is not None else [len(s) for s in spectra]
    ranks = list(start) if start is not None else [minimum] * count
    if budget < sum(ranks):
        raise ValueError(f"a budget of {budget} cannot give {count} layers at least {minimum} each")
    if budget > sum(maximum):
        raise ValueError(f"a budget of {budget} exceeds the lossless total of {sum(maximum)}")
    gains = []
    for spectrum in spectra:
        energy = spectrum.to(torch.float64).pow(2)
        gains.append((energy / energy.sum().clamp_min(1e-300)).tolist())
    heap = [(-gains[layer][ranks[layer]], layer) for layer in range(count) if ranks[layer] < maximum[layer]]
    heapq.heapify(heap)
    for _ in range(budget - sum(ranks)):
        _, layer = heapq.heappop(heap)
        ranks[layer] += 1
        if ranks[layer] < maximum[layer]:
            heapq.heappush(heap, (-gains[layer][ranks[layer]], layer))
    return ranks


def predicted_error(spectrum: torch.Tensor, rank: int) -> float:
    energy = spectrum.to(torch.float64).pow(2)
    return float(energy[rank:].sum() / energy.sum().clamp_min(1e-300))


def candidate_ranks(budget: int, widths: Sequence[int], steps_per_layer: int = 2) -> tuple[int, list[list[int]]]:
    """``(unit, candidates)`` for :func:`allocate_measured`: multiples of ``unit`` (a uniform
    share of the budget divided into ``steps_per_layer``) that a layer could take while every
    other layer keeps at least one unit."""
    count = len(widths)
    unit = max(1, budget // (steps_per_layer * count))
    ceiling = budget - (count - 1) * unit
    candidates = [list(range(unit, min(width, ceiling) + 1, unit)) for width in widths]
    if any(not ranks for ranks in candidates):
        raise ValueError(f"a budget of {budget} leaves no candidate size for some layer")
    return unit, candidates


def allocate_measured(errors: Sequence[Mapping[int, float]], total: int) -> list[int]:
    """One rank per layer, taken from that layer's measured ``{rank: error}``, with
    ``Σ r_l == total`` and the least ``Σ_l e_l(r_l)``.

    Errors measured one layer at a time add up to a good first-order model of the joint error;
    the exact minimum over the candidates is a small knapsack (dynamic programming over totals).
    """
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for layer_errors in errors:
        reached: dict[int, tuple[float, list[int]]] = {}
        for spent, (error, ranks) in best.items():
            for rank, layer_error in layer_errors.items():
                if spent + rank > total:
                    continue
                candidate = (error + layer_error, [*ranks, rank])
                if spent + rank not in reached or candidate[0] < reached[spent + rank][0]:
                    reached[spent + rank] = candidate
        best = reached
    if total not in best:
        raise ValueError(f"no choice of the measured sizes adds up to {total}")
    return best[total][1]
