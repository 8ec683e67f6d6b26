"""Residency policies: small classes that decide which experts sit in each layer's GPU slots.

None of them changes routing. The runtime asks a policy, per MoE layer and forward pass:
- `wants_ids_first` — must the routing be known before the GPU computes (to promote first)?
- `before_compute` — moves (slot, expert) to copy in and use *this* step (the GPU waits);
- `after_compute` — moves to copy in the background, used from the next forward on.
`miss_mode` says where the pairs of non-resident experts run: "cpu" or "fetch" (through the
slots, on demand).
"""

from __future__ import annotations

import numpy as np

from tidecli.errors import TideError
from tidecli.experts.modes import TideOptions
from tidecli.experts.pools import SlotPool
from tidecli.model.moe import ForwardInfo

Moves = list[tuple[int, int]]  # (slot, expert)


def plan_moves(pool: SlotPool, target: list[int], priority: np.ndarray) -> Moves:
    """Bring every expert of `target` (≤ slots) into the pool: free slots first, then evict the
    residents outside `target` with the lowest `priority` (least used)."""
    want = [e for e in target if pool.slot_of_expert[e] < 0]
    if not want:
        return []
    keep = set(target)
    free = pool.free_slots()
    victims = sorted((s for s in range(pool.slots)
                      if pool.expert_of_slot[s] >= 0 and pool.expert_of_slot[s] not in keep),
                     key=lambda s: (priority[pool.expert_of_slot[s]], pool.expert_of_slot[s]))
    slots = (free + victims)[: len(want)]
    return list(zip(slots, want, strict=False))


def top_experts(counts: np.ndarray, budget: int, pool: SlotPool) -> list[int]:
    """The `budget` most used experts with count > 0; ties favour the ones already resident."""
    used = np.nonzero(counts)[0]
    resident = pool.slot_of_expert >= 0
    order = sorted(used.tolist(), key=lambda e: (-int(counts[e]), not resident[e], e))
    return order[:budget]


class Policy:
    name = "base"
    miss_mode = "cpu"
    adaptive = False  # may experts fetched for a miss stay in the pool (tide: yes)

    def attach(self, pools: dict[int, SlotPool], num_experts: int) -> None:
        self.pools = pools
        self.num_experts = num_experts

    def begin_layer(self, layer: int, info: ForwardInfo) -> None:
        """Called before anything else for each layer of each forward pass."""

    def wants_ids_first(self, layer: int, info: ForwardInfo) -> bool:
        return False

    def before_compute(self, layer: int, counts: np.ndarray, info: ForwardInfo) -> Moves:
        return []

    def after_compute(self, layer: int, counts: np.ndarray, info: ForwardInfo) -> Moves:
        return []

    # streamed misses (experts/stream.py): the step runs without the host, so a policy either
    # lets the GPU place a forward's missing experts itself, or places them on the host between
    # forward passes
    def stream_keep(self, info: ForwardInfo) -> bool:
        """May the GPU give this forward's missing experts the slots of unused residents?"""
        return False

    def places_on_host(self, info: ForwardInfo) -> bool:
        """Does `before_compute` still have host-side placements to make (after a forward)?"""
        return False

    def starts_cold(self) -> bool:
        """Does every block begin with empty slots (an ablation)?"""
        return False

    def describe(self) -> dict:
        return {"policy": self.name}


class ResidentPolicy(Policy):
    """Every expert in its slot from the start (needs B = E)."""

    name = "resident"

    def attach(self, pools, num_experts):
        super().attach(pools, num_experts)
        for pool in pools.values():
            if pool.slots < num_experts:
                raise TideError("the resident policy needs every expert on the GPU",
                                "raise --vram, or pick --policy tide")


class LruPolicy(Policy):
    """Swap every step ("Mixtral-Offload"): every miss is fetched before compute, least recently
    used experts are evicted."""

    name = "lru"
    miss_mode = "fetch"

    def attach(self, pools, num_experts):
        super().attach(pools, num_experts)
        self.last_used = {layer: np.zeros(num_experts, dtype=np.int64) for layer in pools}
        self.clock = 0

    def wants_ids_first(self, layer, info):
        return True

    def before_compute(self, layer, counts, info):
        self.clock += 1
        pool = self.pools[layer]
        needed = np.nonzero(counts)[0].tolist()
        recency = self.last_used[layer]
        recency[needed] = self.clock
        if len(needed) > pool.slots:  # the runtime streams the rest through the slots in rounds
            resident = [e for e in needed if pool.slot_of_expert[e] >= 0]
            missing = [e for e in needed if pool.slot_of_expert[e] < 0]
            needed = resident + missing[: pool.slots - len(resident)]
        return plan_moves(pool, needed, recency)


class StaticPolicy(Policy):
    """Fixed placement of the most popular experts ("Fiddler"); every miss runs on the CPU.

    Popularity comes from a calibration trace when given, else from the first forward pass that
    routes tokens (the prompt's prefill, or the first denoising step).
    """

    name = "static"

    def __init__(self, calibration: dict[int, np.ndarray] | None = None) -> None:
        self.calibration = calibration
        self.placed: set[int] = set()

    def wants_ids_first(self, layer, info):
        return layer not in self.placed

    def places_on_host(self, info):
        return len(self.placed) < len(self.pools)

    def before_compute(self, layer, counts, info):
        if layer in self.placed:
            return []
        self.placed.add(layer)
        pool = self.pools[layer]
        popularity = self.calibration.get(layer, counts) if self.calibration else counts
        return plan_moves(pool, top_experts(popularity, pool.slots, pool), popularity)


class TidePolicy(Policy):
    """TIDE interval refresh: at steps t ≡ 0 (mod τ) of a block the placement follows that step's
    routing (top-B used experts, least-used residents evicted); between refreshes it is frozen
    and misses run on the CPU.

    With block routing a step uses at most `pool_experts` experts per layer (the admitted pools
    of the step's routing windows). A layer with at least that many slots follows the pool
    instead: its experts are loaded before the block's first step computes (the runtime cannot
    see the pool, but that step routes every token inside it), and every later step whose
    routing reaches an expert the layer lacks (the pool shifted) refreshes the placement.
    """

    name = "tide"
    adaptive = True

    def __init__(self, opts: TideOptions, *, pool_experts: int = 0) -> None:
        if opts.tau is None or opts.tau < 1:
            raise TideError(f"--tau must be at least 1, got {opts.tau}", "e.g. --tau 4")
        self.opts = opts
        self.pool_experts = pool_experts if opts.follow_pool else 0
        self._last_block: dict[int, int] = {}

    def attach(self, pools, num_experts):
        super().attach(pools, num_experts)
        # the forward each expert was last used in, per layer: a refresh evicts, among the
        # residents it does not keep, the least used and then the least recently used (what
        # the planner's placement assumes, and what the streamed runtime's GPU placement does)
        self.last_used = {layer: np.zeros(num_experts, dtype=np.int64) for layer in pools}
        self.clock = 0

    def _note(self, layer: int, counts: np.ndarray) -> None:
        self.clock += 1
        self.last_used[layer][np.asarray(counts) > 0] = self.clock

    def holds_pool(self, layer: int) -> bool:
        """Does this layer follow the routing pool (block routing, slots for a whole pool)?"""
        return 0 < self.pool_experts <= self.pools[layer].slots

    def _refresh_step(self, layer: int, info: ForwardInfo) -> bool:
        if info.kind != "step" or info.step % self.opts.tau:
            return False
        return not (self.opts.skip_last_step and info.last_step)

    def _pool_step(self, info: ForwardInfo) -> bool:
        return info.kind == "step" and not (self.opts.skip_last_step and info.last_step
                                            and info.step > 0)

    def stream_keep(self, info):
        if self.pool_experts and all(self.holds_pool(layer) for layer in self.pools):
            # the GPU places exactly the experts a step lacks: on every step, the pool's shifts
            return info.kind == "prefill" or self._pool_step(info)
        return info.kind == "prefill" or self._refresh_step(-1, info)

    def starts_cold(self):
        return not self.opts.warm_start

    def _cold(self, pool: SlotPool) -> bool:
        return len(pool.resident()) * 2 < pool.slots

    def begin_layer(self, layer, info):
        if info.kind == "step" and self._last_block.get(layer) != info.block:
            self._last_block[layer] = info.block
            if not self.opts.warm_start:  # cold start: the block begins with empty slots
                self.pools[layer].clear()

    def wants_ids_first(self, layer, info):
        if self.holds_pool(layer) and info.kind == "step" and info.step == 0:
            return True  # the block's pool, loaded before its first step computes
        if not self._refresh_step(layer, info):
            return False
        # an (almost) empty pool has no placement worth serving from: fill it before computing
        return self.opts.stall_refresh or self._cold(self.pools[layer])

    def _refresh(self, layer, counts):
        pool = self.pools[layer]
        # counts first, then recency: counts < 2^31 pairs, the clock < 2^31 forwards × layers
        priority = np.asarray(counts, dtype=np.int64) * (1 << 31) + self.last_used[layer]
        return plan_moves(pool, top_experts(counts, pool.slots, pool), priority)

    def before_compute(self, layer, counts, info):
        self._note(layer, counts)
        return self._refresh(layer, counts)  # only asked on refresh steps that stall

    def after_compute(self, layer, counts, info):
        self._note(layer, counts)
        if self.holds_pool(layer):
            pool = self.pools[layer]
            shifted = bool(((counts > 0) & (pool.slot_of_expert < 0)).any())
            return self._refresh(layer, counts) if shifted and self._pool_step(info) else []
        if info.kind == "prefill":
            # the prompt's experts, copied behind the prefill: the first step starts from them,
            # as it does with streamed misses (else from whatever the prefill's fetch rounds
            # left in the slots: 26-39 % of its pairs hit on a model of the family's width,
            # tools/bench/hit_rate_probe.py, docs/benchmarks.md section 15)
            return self._refresh(layer, counts)
        if not self._refresh_step(layer, info):
            return []
        if self.opts.stall_refresh:
            return []
        return self._refresh(layer, counts)

    def describe(self):
        o = self.opts
        return {"policy": self.name, "tau": o.tau, "stall_refresh": o.stall_refresh,
                "warm_start": o.warm_start, "skip_last_step": o.skip_last_step,
                **({"follow_pool": True} if self.pool_experts else {})}


