"""Routing statistics the cost model needs, per MoE layer and as functions of the budget B:
miss fractions by placement age (f), per-step drift of the hot set (d), distinct experts per step.

Two sources: a recorded `RoutingTrace` (`trace_stats`), or the statistics the TIDE and dMoE
papers publish (`published_stats`): measured, with the same estimator, on a trace drawn from the
generative model of those figures (planner/published.py) that the benchmark also replays.
docs/planner.md derives both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from tidecli.errors import TideError
from tidecli.experts.trace import RoutingTrace
from tidecli.model.config import ModelConfig
from tidecli.planner.published import PublishedRouting

PUBLISHED_STEPS = 240  # denoising steps of the generated trace the defaults are measured on


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

    def miss_tokens_per_call(self, tau: int, steps: int) -> np.ndarray:
        """[L, E+1] tokens per missed expert call for a refresh every `tau` steps: the block's
        missed pairs over its missed experts. A fresh placement misses the experts entering the
        step, used by a token or two; an old one misses popular ones too, so the τ-free average
        (`tokens_per_call`, over every age) overstates the batch at τ = 1 about twofold. Where
        nothing misses, that average."""
        return self.tokens_per_missed_call(*self.block_mean_miss(tau, steps))

    def tokens_per_missed_call(self, mp: np.ndarray, me: np.ndarray) -> np.ndarray:
        """`miss_tokens_per_call` from the block's miss fractions `block_mean_miss` gave."""
        experts = me * self.distinct[:, None]
        per_call = mp * self.pairs / np.maximum(experts, 1e-9)
        return np.maximum(np.where(experts > 1e-9, per_call, self.tokens_per_call), 1.0)

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


@lru_cache(maxsize=64)
def _published_layer(experts: int, per_token: int, block_length: int, steps: int,
                     max_age: int, capacity: int = 0, window: int = 0) -> RoutingStats:
    """One layer's statistics on a trace of the published model (every layer draws alike)."""
    gen = PublishedRouting(num_experts=experts, experts_per_token=per_token, num_layers=1,
                           block_length=block_length, capacity=capacity, window=window)
    tr = RoutingTrace(1, experts, [0])
    for b in range(max(2, -(-PUBLISHED_STEPS // steps))):
        for s in range(steps):
            tr.append(gen.counts(b, s), kind="step", block=b, step=s, tokens=block_length)
    return _stats(tr, max_age)


def published_stats(cfg: ModelConfig, *, block_length: int, max_age: int) -> RoutingStats:
    """Every layer alike: the statistics of a trace drawn from the published figures' model
    (≈ 70 distinct experts of 256 per 32-token step, similarity 0.985 → 0.95 over 5 steps), in
    blocks of `max_age` + 1 steps. Its popularity is not this model's: no RAM-tier cover. With
    block routing each routing window draws a pool of at most `expert_capacity` experts: a
    step's distinct experts never exceed the bound."""
    one = _published_layer(cfg.num_experts, cfg.num_experts_per_tok, block_length,
                           max(2, max_age + 1), max_age, cfg.expert_capacity, cfg.block_size)
    layers = cfg.num_moe_layers

    def rep(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, layers, axis=0)

    return replace(one, source="published", distinct=rep(one.distinct),
                   miss_pairs=rep(one.miss_pairs), miss_experts=rep(one.miss_experts),
                   drift=rep(one.drift), tokens_per_call=rep(one.tokens_per_call),
                   steps_per_block=None, ram_cover=None)


# ---- estimates from a routing trace --------------------------------------------------------------


def block_runs(tr: RoutingTrace) -> list[tuple[int, int]]:
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
    return _stats(tr, max_age)


def _stats(tr: RoutingTrace, max_age: int) -> RoutingStats:
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
    runs = block_runs(tr)
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
