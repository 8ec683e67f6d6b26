"""Bounds for the benchmarks, computed from a recorded routing trace.

Transfer volume: the fewest expert copies host → GPU that any schedule with B slots per layer
needs if every routed expert is computed on the GPU at the step that uses it. A step's experts
that are not resident must be copied; afterwards the layer keeps at most B of the experts it
holds or just used. Keeping the B whose next use comes soonest (Belady's rule, with bypass) is
optimal; `brute_force_loads` checks it on small traces.

Routing statistics: distinct experts per layer per step and the cosine similarity of a layer's
expert counts k steps apart inside a block, for any trace (real or synthetic routing).
"""

from __future__ import annotations

import itertools

import numpy as np


def belady_loads(used: list[set[int]] | np.ndarray, slots: int) -> int:
    """Expert loads for one layer: `used[t]` is the set of experts step t needs (or a counts
    row [E]); the cache starts empty."""
    steps = [set(np.nonzero(u)[0].tolist()) if isinstance(u, np.ndarray) else set(u)
             for u in used]
    n = len(steps)
    # next_use[t][e]: first step > t that uses e
    next_use: list[dict[int, int]] = [dict() for _ in range(n)]
    upcoming: dict[int, int] = {}
    for t in range(n - 1, -1, -1):
        next_use[t] = dict(upcoming)
        for e in steps[t]:
            upcoming[e] = t
    cache: set[int] = set()
    loads = 0
    for t, need in enumerate(steps):
        loads += len(need - cache)
        candidates = cache | need
        if len(candidates) > slots:
            nxt = next_use[t]
            ranked = sorted(candidates, key=lambda e: (nxt.get(e, n + 1), e))
            cache = set(ranked[:slots])
        else:
            cache = candidates
    return loads


def brute_force_loads(used: list[set[int]], slots: int) -> int:
    """The same minimum by trying every cache content after every step (tiny traces only)."""
    best: dict[frozenset, int] = {frozenset(): 0}
    for need in used:
        nxt: dict[frozenset, int] = {}
        for cache, cost in best.items():
            cost = cost + len(need - cache)
            pool = sorted(cache | need)
            for r in range(min(slots, len(pool)) + 1):
                for keep in itertools.combinations(pool, r):
                    key = frozenset(keep)
                    if cost < nxt.get(key, 1 << 60):
                        nxt[key] = cost
        best = nxt
    return min(best.values())


def oracle_loads(counts: np.ndarray, budgets: list[int]) -> int:
    """Sum over layers; counts [S, L, E] of the denoising steps in order."""
    return sum(belady_loads(list(counts[:, j] > 0), budgets[j]) for j in range(counts.shape[1]))


def best_hit_rate(counts: np.ndarray, budgets: list[int]) -> float:
    """The share of (token, expert) pairs a placement of B_l experts could serve if it were
    re-chosen, with foresight, for every forward pass: an upper bound on any policy's GPU hit
    rate (counts [F, L, E])."""
    total = float(counts.sum())
    if not total:
        return 1.0
    srt = -np.sort(-counts.astype(np.int64), axis=-1)  # each row descending
    served = sum(float(srt[:, j, : budgets[j]].sum()) for j in range(counts.shape[1]))
    return served / total


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def routing_stats(counts: np.ndarray, blocks: list[int], *, lags: tuple[int, ...] = (1, 5)) -> dict:
    """counts [S, L, E] of consecutive denoising steps; blocks[s] the block of step s."""
    c = counts.astype(np.float64)
    out: dict = {"steps": int(c.shape[0])}
    if not c.shape[0]:
        return out
    out["distinct_per_layer_step"] = round(float((c > 0).sum(-1).mean()), 2)
    out["distinct_max_per_layer_step"] = int((c > 0).sum(-1).max())
    out["pairs_per_layer_step"] = round(float(c.sum(-1).mean()), 2)
    b = np.asarray(blocks)
    for lag in lags:
        same = b[lag:] == b[:-lag] if lag < len(b) else np.zeros(0, dtype=bool)
        if not same.any():
            out[f"similarity_lag{lag}"] = None
            continue
        sims = _cos(c[lag:][same], c[:-lag][same])
        out[f"similarity_lag{lag}"] = round(float(sims.mean()), 4)
    return out


def agreement(out: list[list[int]], ref: list[list[int]]) -> float:
    """Share of the reference's tokens that the run reproduced at the same position."""
    total = sum(len(r) for r in ref)
    same = sum(int(a == b) for o, r in zip(out, ref, strict=True)
               for a, b in zip(o, r, strict=False))
    return same / total if total else 1.0
