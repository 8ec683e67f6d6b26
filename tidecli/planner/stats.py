"""Routing statistics the cost model needs, per MoE layer and as functions of the budget B:
miss fractions by placement age (f), per-step drift of the hot set (d), distinct experts per step.

Two sources: a recorded `RoutingTrace` (`trace_stats`), or the statistics the TIDE and dMoE
papers publish (`published_stats`). docs/planner.md derives both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tidecli.errors import TideError
from tidecli.experts.trace import RoutingTrace
from tidecli.model.config import ModelConfig

# Published: ≈ 70 distinct experts of 256 (top-8) per layer for a 32-token step of LLaDA2.0-mini;
# cosine similarity of a layer's expert use ≈ 0.985 one step apart and ≈ 0.95 five steps apart.
PUBLISHED_DISTINCT = 70.0
PUBLISHED_AT = (256, 8, 32)  # (experts, experts per token, tokens per step) of that figure
PUBLISHED_SIMILARITY = ((1, 0.985), (5, 0.95))


@dataclass(frozen=True, eq=False)
class RoutingStats:
    source: str  # "trace" | "published"
    pairs: float  # routed (token, expert) pairs per layer per step: tokens × top-k
    distinct: np.ndarray  # [L] mean distinct experts used per step
    miss_pairs: np.ndarray  # [L, A+1, E+1] share of a step's pairs outside a placement of age a
    miss_experts: np.ndarray  # [L, A+1, E+1] share of a step's used experts outside it
    drift: np.ndarray  # [L, E+1] d: experts promoted per step and slot when refreshing every step
    tokens_per_call: np.ndarray  # [L, E+1] tokens per missed expert call (CPU batch size)
    steps_per_block: float | None = None  # measured (trace) or None
    steps: int = 0  # denoising steps the estimate rests on
    # [L, E+1] share of a step's used experts among the R most popular of the layer (the RAM
    # tier of R experts); None → popularity unknown, every expert alike: R / E
    ram_cover: np.ndarray | None = None

    def ram_share(self, ram: np.ndarray) -> np.ndarray:
        """[L] share of a step's used (and so of its missed) experts found in a RAM tier of
        ram[ℓ] experts chosen by popularity."""
        ram = np.asarray(ram)
        if self.ram_cover is None:
            e = self.miss_pairs.shape[2] - 1
            return np.clip(ram / e, 0.0, 1.0)
        return self.ram_cover[np.arange(len(ram)), ram]

    @property
    def max_age(self) -> int:
        return self.miss_pairs.shape[1] - 1

    @property
    def num_layers(self) -> int:
        return self.miss_pairs.shape[0]

    def block_mean_miss(self, tau: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Block-average (pair, expert) miss fractions [L, E+1] for a refresh every `tau` steps."""
        ages = np.minimum(np.asarray(refresh_ages(tau, steps)), self.max_age)
        return self.miss_pairs[:, ages].mean(axis=1), self.miss_experts[:, ages].mean(axis=1)


def refresh_ages(tau: int, steps: int) -> list[int]:
    """Age of the placement each step of a block computes with. The runtime refreshes after a
    refresh step's compute (asynchronously), so the placement taken at step r serves steps
    r+1 .. r+τ (ages 1..τ); step 0 keeps the previous block's placement, counted as age τ."""
    return [tau] + [((t - 1) % tau) + 1 for t in range(1, steps)]


# ---- published statistics -----------------------------------------------------------------------


def similarity_curve(ages: np.ndarray) -> np.ndarray:
    """ρ(a) = ρ∞ + (1 − ρ∞)·r^a through both published points (ρ(0) = 1): a hot set that keeps a
    persistent core and renews the rest geometrically."""
    (a1, s1), (a5, s5) = PUBLISHED_SIMILARITY
    target = (1 - s5) / (1 - s1)  # = (1 − r^a5) / (1 − r^a1), increasing in r
    lo, hi = 1e-9, 1 - 1e-9
    for _ in range(100):
        r = (lo + hi) / 2
        if (1 - r**a5) / (1 - r**a1) < target:
            lo = r
        else:
            hi = r
    r = (lo + hi) / 2
    floor = 1 - (1 - s1) / (1 - r**a1)
    return floor + (1 - floor) * r ** np.asarray(ages, dtype=np.float64)


def default_distinct(cfg: ModelConfig, *, block_length: int) -> float:
    """Distinct experts per step. The published 70 of 256 for 32 tokens × top-8 equals n_eff ≈ 10
    *independent* tokens drawing top-8 uniformly (tokens of a block route alike); we keep that
    share n_eff / tokens and apply it to this model's experts, top-k and block length."""
    e0, k0, n0 = PUBLISHED_AT
    n_eff0 = math.log(1 - PUBLISHED_DISTINCT / e0) / math.log(1 - k0 / e0)
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    n_eff = n_eff0 * block_length / n0
    distinct = e * (1 - (1 - k / e) ** n_eff)
    return float(min(distinct, e, block_length * k))


def published_stats(cfg: ModelConfig, *, block_length: int, max_age: int) -> RoutingStats:
    """Every layer alike. The used experts of a step are taken as equally loaded (so the top-B
    of a step covers B/D of its pairs, a conservative reading), and ρ(a) as the share of a step's
    hot set still used a steps later. Slots beyond D hold earlier experts, which a newly used
    expert hits by chance: (B − D)/(E − D)."""
    e, layers = cfg.num_experts, cfg.num_moe_layers
    d_used = default_distinct(cfg, block_length=block_length)
    rho = similarity_curve(np.arange(max_age + 1))
    b = np.arange(e + 1, dtype=np.float64)
    held = np.minimum(b, d_used) / d_used
    spare = np.clip(b - d_used, 0, None) / (e - d_used) if e > d_used else np.ones_like(b)
    cover = held[None, :] * rho[:, None] + (1 - rho[:, None]) * spare[None, :]
    miss = np.clip(1 - cover, 0.0, 1.0)
    turnover = 1 - rho[1] if max_age >= 1 else 1 - similarity_curve(np.array([1]))[0]
    # B ≤ D: each refresh replaces the slots whose expert left the hot set; B > D: the target is
    # the whole used set and only new experts not sitting in a spare slot are copied
    drift = np.where(b <= d_used, turnover,
                     d_used * turnover * (1 - spare) / np.maximum(b, 1))
    drift[0] = 0.0
    pairs = float(block_length * cfg.num_experts_per_tok)
    return RoutingStats(
        source="published", pairs=pairs, distinct=np.full(layers, d_used),
        miss_pairs=np.repeat(miss[None], layers, axis=0),
        miss_experts=np.repeat(miss[None], layers, axis=0),
        drift=np.repeat(drift[None], layers, axis=0),
        tokens_per_call=np.full((layers, e + 1), max(1.0, pairs / d_used)))


# ---- estimates from a routing trace --------------------------------------------------------------


def _block_runs(tr: RoutingTrace) -> list[tuple[int, int]]:
    """[start, stop) of each block's consecutive steps (a new block, or the step index restarts)."""
    runs, start = [], 0
    for i in range(1, len(tr) + 1):
        if i == len(tr) or tr.blocks[i] != tr.blocks[i - 1] or tr.steps[i] <= tr.steps[i - 1]:
            runs.append((start, i))
            start = i
    return runs


def trace_stats(trace: RoutingTrace, *, cfg: ModelConfig, max_age: int) -> RoutingStats:
    """For every block, layer and step s: the placement P_s(B) = the B experts ranked first by
    their count at s (then by their use earlier in the trace — what a warm pool still holds —
    then by id). f(a, B) = share of the pairs (and of the used experts) of step s+a of the same
    block outside P_s(B), averaged over s; d(B) = |top-B used at s+1 \\ P_s(B)| / B, averaged."""
    if trace.num_experts != cfg.num_experts or list(trace.moe_layers) != list(cfg.moe_layers):
        raise TideError("the routing trace was recorded with another model "
                        f"({trace.num_layers} MoE layers × {trace.num_experts} experts)",
                        "record one with this model: tide generate --trace FILE")
    tr = trace.steps_only()
    if len(tr) < 2:
        raise TideError("the routing trace holds fewer than 2 denoising steps",
                        "record a longer one: tide generate --trace FILE")
    counts = tr.array().astype(np.int64)  # [F, L, E]
    _f, layers, e = counts.shape
    sum_p = np.zeros((layers, max_age + 1, e + 1))
    sum_e = np.zeros_like(sum_p)
    seen = np.zeros(max_age + 1)
    promoted = np.zeros((layers, e + 1))
    pairs_seen = 0
    history = np.zeros((layers, e), dtype=np.int64)
    big = int(counts.sum()) + 1  # any count outranks any amount of earlier use
    positions = np.broadcast_to(np.arange(e), (layers, e))
    runs = _block_runs(tr)
    for start, stop in runs:
        c = counts[start:stop]
        n = stop - start
        orders, ranks = [], []
        for s in range(n):
            order = np.argsort(-(c[s] * big + history), axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, positions, axis=1)
            orders.append(order)
            ranks.append(rank)
            history += c[s]
        for s in range(n):
            for a in range(min(max_age, n - 1 - s) + 1):
                nxt = c[s + a]
                ranked = np.take_along_axis(nxt, orders[s], axis=1)
                total = np.maximum(nxt.sum(axis=1), 1)[:, None]
                used = np.maximum((nxt > 0).sum(axis=1), 1)[:, None]
                cov_p = np.concatenate([np.zeros((layers, 1)), np.cumsum(ranked, axis=1)], axis=1)
                cov_e = np.concatenate([np.zeros((layers, 1)), np.cumsum(ranked > 0, axis=1)],
                                       axis=1)
                sum_p[:, a] += 1 - cov_p / total
                sum_e[:, a] += 1 - cov_e / used
                seen[a] += 1
            if s + 1 < n:
                # an expert of rank r1 in step s+1's target and rank r0 in P_s is copied for
                # every B in (r1, r0]: accumulate all budgets at once with a difference array
                r0, r1 = ranks[s], ranks[s + 1]
                d1 = (c[s + 1] > 0).sum(axis=1)[:, None]
                li, ei = np.nonzero((r1 < d1) & (r0 > r1))
                diff = np.zeros((layers, e + 2))
                np.add.at(diff, (li, r1[li, ei] + 1), 1)
                np.add.at(diff, (li, r0[li, ei] + 1), -1)
                promoted += np.cumsum(diff, axis=1)[:, : e + 1]
                pairs_seen += 1
    for a in range(max_age + 1):  # ages no block was long enough to show: carry the last one
        if seen[a] == 0:
            sum_p[:, a], sum_e[:, a], seen[a] = sum_p[:, a - 1], sum_e[:, a - 1], seen[a - 1]
    miss_p = np.clip(sum_p / seen[None, :, None], 0.0, 1.0)
    miss_e = np.clip(sum_e / seen[None, :, None], 0.0, 1.0)
    b = np.arange(e + 1)
    drift = np.zeros((layers, e + 1))
    if pairs_seen:
        drift = np.clip(promoted / pairs_seen / np.maximum(b, 1)[None, :], 0.0, 1.0)
    drift[:, 0] = 0.0
    pairs = float(counts.sum(axis=2).mean())
    distinct = (counts > 0).sum(axis=2).mean(axis=0).astype(np.float64)
    # tokens per missed call: missed pairs over missed experts, summed over the ages ≥ 1
    lo = 1 if max_age >= 1 else 0
    num = (miss_p[:, lo:] * pairs).sum(axis=1)
    den = (miss_e[:, lo:] * distinct[:, None, None]).sum(axis=1)
    fallback = np.maximum(1.0, pairs / np.maximum(distinct, 1.0))[:, None]
    per_call = np.where(den > 1e-9, num / np.maximum(den, 1e-9), fallback)
    # the RAM tier keeps the experts used in the most steps: its share of all used experts
    used = (counts > 0).sum(axis=0).astype(np.float64)  # [L, E] steps each expert was used in
    ranked = -np.sort(-used, axis=1)
    ram_cover = np.concatenate([np.zeros((layers, 1)), np.cumsum(ranked, axis=1)], axis=1)
    ram_cover /= np.maximum(used.sum(axis=1), 1.0)[:, None]
    return RoutingStats(
        source="trace", pairs=pairs, distinct=distinct, miss_pairs=miss_p, miss_experts=miss_e,
        drift=drift, tokens_per_call=np.maximum(per_call, 1.0),
        steps_per_block=float(np.mean([stop - start for start, stop in runs])), steps=len(tr),
        ram_cover=np.clip(ram_cover, 0.0, 1.0))
