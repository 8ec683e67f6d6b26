"""Exact allocation of a budget over layers: the fewest predicted milliseconds for a total of
slots (GPU expert slots, or experts kept in RAM)."""

from __future__ import annotations

import numpy as np


def allocate_slots(costs: np.ndarray, total: int) -> np.ndarray:
    """Exact min Σ_ℓ costs[ℓ, B_ℓ] subject to Σ B_ℓ ≤ total, 1 ≤ B_ℓ ≤ E (a min-plus
    dynamic programme over layers; O(L·E·total) in vector steps of `total`)."""
    layers, e1 = costs.shape
    e = e1 - 1
    total = int(min(total, layers * e))
    if total < layers:
        raise ValueError("fewer slots than layers")
    best = np.full(total + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((layers, total + 1), dtype=np.int32)
    for j in range(layers):
        new = np.full(total + 1, np.inf)
        pick = choice[j]
        for b in range(1, min(e, total) + 1):
            cand = best[: total + 1 - b] + costs[j, b]
            better = cand < new[b:]
            new[b:][better] = cand[better]
            pick[b:][better] = b
        best = new
    # among equal costs prefer more slots: spare slots still catch returning experts
    s = total - int(np.argmin(best[::-1]))
    out = np.zeros(layers, dtype=np.int64)
    for j in reversed(range(layers)):
        out[j] = choice[j, s]
        s -= out[j]
    return out
