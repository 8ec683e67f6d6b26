"""The read-ahead between denoising steps (`--prefetch step`, streamed misses): what to copy.

Before a step's forward pass runs, the host holds a guess of each MoE layer's experts for it
(the step before's ranks, model/stepranks.py, or a benchmark workload's, `Router.step_guess`)
and the device placement as it is. Each layer keeps the experts the guess names most, as many
as it has slots; those without a slot take the slots of experts outside that set — free slots
first, then least recently used — and their rows are copied from pinned RAM by the copy
engine (`StreamRuntime.prefetch_step`), in layer order, while the step's earlier layers
compute: a layer waits only for its own copies. The layer's own plan then runs as always, so
a wrong guess costs a copy and a slot, never a different result.

`plan_ahead` is the vectorized plan; `plan_ahead_reference` spells it layer by layer with
Python sets and is what the tests hold it to.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from tidecli.errors import TideError
from tidecli.experts.readahead import ReadAheadGate, score_guesses
from tidecli.model.counters import ExpertStats
from tidecli.model.moe import ForwardInfo
from tidecli.model.program import side_stream

_FAR = np.int64(1) << 62  # sort key of a slot that may not take a guess


def plan_ahead(guess: np.ndarray, table: np.ndarray, owner: np.ndarray, last: np.ndarray,
               slots: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """`guess` [M, ...] expert ids (the number of times an expert appears is its vote);
    `table` [M, E+1] expert → slot (-1: none; column E unused), `owner` [M, ≥B] slot → expert,
    `last` [M, ≥B] each slot's last use, `slots` [M] the layers' slot counts. Updates `table`
    and `owner` in place and returns, per layer, (experts, slots) to copy.

    A layer keeps the B experts with the most votes (ties: those already in a slot, then the
    lower id): those of them without a slot take, most voted first, the slots of experts
    outside that set — free slots first, then in order of `last` (ties: the lower slot)."""
    m, e = table.shape[0], table.shape[1] - 1
    b = int(owner.shape[1])
    ids = guess.reshape(m, -1)
    cnt = np.bincount((ids + np.arange(m)[:, None] * e).ravel(), minlength=m * e).reshape(m, e)
    held = table[:, :e] >= 0
    order = np.lexsort((np.broadcast_to(np.arange(e), (m, e)), ~held, -cnt), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(e), (m, e)), axis=1)
    wanted = (cnt > 0) & (rank < slots[:, None])
    missing = wanted & ~held
    own = owner[:, :b]
    in_layer = np.arange(b)[None, :] < slots[:, None]
    own_wanted = np.take_along_axis(wanted, np.where(own >= 0, own, 0), axis=1) & (own >= 0)
    avail = in_layer & ~own_wanted
    key = np.where(avail, np.where(own >= 0, last[:, :b] + 1, -1), _FAR)
    victims = np.argsort(key, axis=1, kind="stable")
    n = missing.sum(1)  # never more than the slots outside the kept set
    out = []
    for j in range(m):
        nj = int(n[j])
        if nj == 0:
            out.append((np.empty(0, np.int64), np.empty(0, np.int64)))
            continue
        ex = order[j][missing[j, order[j]]].astype(np.int64)
        sl = victims[j, :nj].astype(np.int64)
        old = owner[j, sl]
        table[j, old[old >= 0]] = -1
        table[j, ex] = sl
        owner[j, sl] = ex
        out.append((ex, sl))
    return out


def plan_ahead_reference(guess: np.ndarray, table: np.ndarray, owner: np.ndarray,
                         last: np.ndarray, slots: np.ndarray) -> list[tuple[list, list]]:
    """`plan_ahead`, one layer and one expert at a time."""
    out = []
    for j in range(table.shape[0]):
        votes: dict[int, int] = {}
        for x in guess[j].ravel().tolist():
            votes[x] = votes.get(x, 0) + 1
        kept = sorted(votes, key=lambda x: (-votes[x], table[j, x] < 0, x))[: int(slots[j])]
        missing = [x for x in kept if table[j, x] < 0]
        free = [s for s in range(int(slots[j])) if owner[j, s] < 0]
        other = [s for s in range(int(slots[j]))
                 if owner[j, s] >= 0 and int(owner[j, s]) not in kept]
        victims = free + sorted(other, key=lambda s: (int(last[j, s]), s))
        ex, sl = [], []
        assert len(victims) >= len(missing)
        for x, s in zip(missing, victims, strict=False):
            old = int(owner[j, s])
            if old >= 0:
                table[j, old] = -1
            table[j, x] = s
            owner[j, s] = x
            ex.append(x)
            sl.append(s)
        out.append((ex, sl))
    return out


class StepAhead:
    """The read-ahead's state beside a StreamRuntime: pinned copies of its device tables (read
    before each read-ahead) and routing counts (queued after every forward, to score the
    guesses), the copy stream, and one event per MoE layer recorded after that layer's copies
    (the captured step waits on it: an external event, recorded outside the graph)."""

    def __init__(self, rt, slots: np.ndarray) -> None:
        """`slots` [M]: how many slots each MoE layer may place into (0: none)."""
        self.rt = rt
        self.slots = slots
        self.cuda = rt.device.type == "cuda"
        pin = self.cuda
        self.table = torch.empty(rt.table.shape, dtype=torch.long, pin_memory=pin)
        self.owner = torch.empty(rt.owner.shape, dtype=torch.long, pin_memory=pin)
        self.last = torch.empty(rt.last.shape, dtype=torch.long, pin_memory=pin)
        self.counts = torch.zeros(rt.counts.shape, dtype=torch.long, pin_memory=pin)
        m = rt.cfg.num_moe_layers
        self.events: list | None = None
        self.stream = None
        if self.cuda:
            try:
                self.events = [torch.cuda.Event(external=True) for _ in range(m)]
            except TypeError:
                raise TideError("--prefetch step needs a PyTorch whose CUDA events can be "
                                "waited on inside a captured graph (torch.cuda.Event(external="
                                "True))", "upgrade torch, or use --prefetch off") from None
            self.stream = side_stream(rt.device, "copy")
            # torch creates an event when it is first recorded, and a wait on one not yet
            # created is dropped: recorded once here, so that a step captured before the first
            # read-ahead holds its wait nodes
            for ev in self.events:
                ev.record(self.stream)
        self.src = np.full((m, max(rt.bmax, 1)), -1, dtype=np.int64)  # experts placed ahead
        self.placed = False  # the forward in progress had experts placed ahead
        self.refresh = False  # the forward in progress may move experts (τ)

    def after_forward(self) -> None:
        """Queue the copy of the forward's routing counts (the caller's event or sync follows)."""
        self.counts.copy_(self.rt.counts, non_blocking=self.cuda)

    def begin(self, info: ForwardInfo, refresh: bool) -> None:
        self.refresh = refresh and info.kind == "step"
        if self.cuda and info.kind != "step":  # no read-ahead for it: every copy lands first
            torch.cuda.current_stream(self.rt.device).wait_stream(self.stream)

    def wait(self, j: int) -> None:
        """Device phase of MoE layer j: its copies land before anything reads its slots."""
        if self.events is not None:
            torch.cuda.current_stream(self.rt.device).wait_event(self.events[j])

    def run(self, guess) -> int:
        """Place the guessed experts (`guess()`: [M, ...] or None) of the forward about to run;
        returns how many. The guess is asked for only on a refresh with the read-ahead on."""
        rt = self.rt
        if not self.refresh:
            return 0
        guess = guess()
        if guess is None:
            return 0
        # the tables as the device holds them now: a forward's end is not the only writer
        # (capturing a step runs its layers once, a policy may place on the host)
        for host, dev in ((self.table, rt.table), (self.owner, rt.owner), (self.last, rt.last)):
            host.copy_(dev, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.current_stream(rt.device).synchronize()
        layers = rt.cfg.moe_layers
        table, owner = self.table.numpy(), self.owner.numpy()
        moves = plan_ahead(guess, table, owner, self.last.numpy(), self.slots)
        self.src.fill(-1)
        total = 0
        for j, (ex, _sl) in enumerate(moves):
            self.src[j, : ex.size] = ex
            total += int(ex.size)
        self.placed = total > 0
        if not total:
            return 0
        main = torch.cuda.current_stream(rt.device) if self.cuda else None
        rt.table.copy_(self.table, non_blocking=self.cuda)
        rt.owner.copy_(self.owner, non_blocking=self.cuda)
        ctx = contextlib.nullcontext()
        if self.cuda:
            self.stream.wait_stream(main)  # the tables first; the last forward is done
            ctx = torch.cuda.stream(self.stream)
        with ctx:
            for j, (ex, sl) in enumerate(moves):
                layer = layers[j]
                buf, rows = rt.pools.pools[layer].buf, rt.store.layers[layer]
                for e, s in zip(ex.tolist(), sl.tolist(), strict=True):
                    buf[s].copy_(rows[e], non_blocking=self.cuda)
                if self.events is not None:
                    self.events[j].record(self.stream)
        return total

    def score(self, counts: np.ndarray | None, stats: ExpertStats, gate: ReadAheadGate) -> None:
        """After the forward: what was placed ahead for it and how much its layers used (the
        forward's `counts` [M, E], or the mirror's), into `stats`; the gate hears it (off, it
        counts the forward)."""
        gate.after_forward(stats, self.placed, lambda: score_guesses(
            self.src, self.counts.numpy() if counts is None else counts,
            self.rt.cfg.moe_layers, stats, self.rt.expert_bytes))
        self.placed = False

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
