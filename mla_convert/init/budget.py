"""Per-layer latent sizes under a total cache budget, from calibrated spectra."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch


def allocate_ranks(
    spectra: Sequence[torch.Tensor], budget: int, minimum: int = 1, maximum: Sequence[int] | None = None
) -> list[int]:
    """Ranks ``r_l`` with ``Σ r_l == budget`` minimising ``Σ_l e_l(r_l)``.

    ``e_l(r) = Σ_{i>r} σ_{l,i}² / Σ_i σ_{l,i}²`` is layer ``l``'s predicted relative squared error
    on the calibration activations when its latent keeps ``r`` directions. Each extra rank of a
    layer saves ``σ²_{l,r+1} / Σσ²``, and those savings only shrink as ``r`` grows, so handing out
    the budget one rank at a time to the layer that saves most is optimal.
    """
    count = len(spectra)
    maximum = list(maximum) if maximum is not None else [len(s) for s in spectra]
    if budget < minimum * count:
        raise ValueError(f"a budget of {budget} cannot give {count} layers at least {minimum} each")
    if budget > sum(maximum):
        raise ValueError(f"a budget of {budget} exceeds the lossless total of {sum(maximum)}")
    gains = []
    for spectrum in spectra:
        energy = spectrum.to(torch.float64).pow(2)
        gains.append((energy / energy.sum().clamp_min(1e-300)).tolist())
    ranks = [minimum] * count
    heap = [(-gains[layer][minimum], layer) for layer in range(count) if minimum < maximum[layer]]
    heapq.heapify(heap)
    for _ in range(budget - minimum * count):
        _, layer = heapq.heappop(heap)
        ranks[layer] += 1
        if ranks[layer] < maximum[layer]:
            heapq.heappush(heap, (-gains[layer][ranks[layer]], layer))
    return ranks


def predicted_error(spectrum: torch.Tensor, rank: int) -> float:
    energy = spectrum.to(torch.float64).pow(2)
    return float(energy[rank:].sum() / energy.sum().clamp_min(1e-300))
