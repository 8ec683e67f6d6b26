"""How well a checkpoint's routing can be guessed ahead, measured on any device (numpy scoring).

Three guesses, each a set of experts for a MoE layer that its routing has not chosen yet:
- across layers (what `--prefetch layer` reads): layer l+1's router applied to layer l's input;
- across steps (not built: measured to see whether it would pay): the experts each token ranks
  just below its top-k at step t, for the same layer at step t+1 of the block;
- across blocks (not built): for a block's first denoising step, whose tokens are all masks,
  the experts the previous block's first step used.

`GuessRecorder` is the model's own routing (the same ids and weights) that also records, per
forward and MoE layer, the chosen ids, the next-ranked experts and the next layer's guess.
`score` compares them with what was used:

- layer: of the next layer's guessed experts that the same layer did not use one step earlier
  (those a runtime would have to read: about the ones the read-ahead places), the share the
  layer then used (`precision`), and the share of its newly used experts that were guessed
  (`recall`);
- step: of the next-ranked experts (not in the step's own choice), the share that enter the
  layer's choice at the next step (`precision`), and the share of the entering experts they
  cover (`recall`);
- block: the same for a block's first step against the forward just before it (the previous
  block's commit pass).

`new_per_layer` (experts a layer uses that the forward before did not) says how many copies
each kind of forward needs: a block's first step against the steps inside a block. Every
score leaves out only the forward before's experts; a runtime's slots hold more (its recent
past), so what a guess would spare a runtime is at most this (docs/benchmarks.md, section 23).

A guess never changes what is computed; these figures say only how many copies it could hide
and how many it would waste.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tidecli.model.config import ModelConfig
from tidecli.model.moe import ForwardInfo, Router
from tidecli.model.router import biased, choose, predict, router_scores, routing_weights
from tidecli.model.weights import RouterWeights


@dataclass
class LayerRecord:
    ids: np.ndarray  # [T, k] the routing's choice
    next_ranked: np.ndarray  # [T, m] each token's experts ranked just below its choice
    guess_next_layer: np.ndarray | None  # [T, k] the next MoE layer's router on this input


@dataclass
class ForwardRecord:
    info: ForwardInfo
    layers: dict[int, LayerRecord] = field(default_factory=dict)  # by MoE layer index


class GuessRecorder(Router):
    def __init__(self, routers: list[RouterWeights], *, ranked: int = 2) -> None:
        """`routers`: every MoE layer's router weights, in order; `ranked`: how many experts
        below its choice each token offers as the step guess."""
        self.routers = routers
        self.ranked = ranked
        self.forwards: list[ForwardRecord] = []

    def begin(self, info: ForwardInfo, tokens: int) -> None:
        self.forwards.append(ForwardRecord(info))

    def __call__(self, moe_index: int, x: torch.Tensor, w: RouterWeights, cfg: ModelConfig, *,
                 static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # route()'s own steps, with the scores kept for the ranks below the choice
        scores = router_scores(x, w)
        ids = choose(scores, w, cfg)
        weights = routing_weights(scores, ids, cfg)
        below = biased(scores, w).scatter(1, ids, float("-inf")).topk(self.ranked, dim=-1).indices
        nxt = predict(x, self.routers[moe_index + 1], cfg) \
            if moe_index + 1 < len(self.routers) else None
        self.forwards[-1].layers[moe_index] = LayerRecord(
            ids.cpu().numpy(), below.cpu().numpy(),
            nxt.cpu().numpy() if nxt is not None else None)
        return ids, weights


@dataclass
class GuessScore:
    guessed: int = 0  # experts guessed (and not already used, see the module's docstring)
    hit: int = 0  # of those, experts then used
    new: int = 0  # experts newly used (the ones a runtime has to read)
    cases: int = 0  # (layer, forward) pairs scored

    @property
    def precision(self) -> float | None:
        return self.hit / self.guessed if self.guessed else None

    @property
    def recall(self) -> float | None:
        return self.hit / self.new if self.new else None

    def add(self, guessed: set[int], used: set[int], before: set[int]) -> None:
        """`guessed` scored against `used`, leaving out the experts in `before` (used one step
        earlier: resident under any useful policy)."""
        g = guessed - before
        new = used - before
        self.guessed += len(g)
        self.hit += len(g & new)
        self.new += len(new)
        self.cases += 1

    def to_dict(self) -> dict:
        p, r = self.precision, self.recall
        return {"guessed": self.guessed, "hit": self.hit, "new": self.new,
                "precision": round(p, 4) if p is not None else None,
                "recall": round(r, 4) if r is not None else None,
                "new_per_layer": round(self.new / self.cases, 2) if self.cases else None}


def _steps(forwards: list[ForwardRecord]) -> list[tuple[ForwardRecord, ForwardRecord]]:
    """Consecutive denoising steps of the same block."""
    steps = [f for f in forwards if f.info.kind == "step"]
    return [(a, b) for a, b in zip(steps, steps[1:], strict=False)
            if a.info.block == b.info.block and b.info.step == a.info.step + 1]


def _used(rec: LayerRecord) -> set[int]:
    return set(rec.ids.ravel().tolist())


def _block_starts(forwards: list[ForwardRecord]):
    """(the previous block's first step, the forward just before, this block's first step)
    for every block's first denoising step that follows the previous block's commit pass in
    the same generation (the decoder commits every block but a generation's last)."""
    first_step: ForwardRecord | None = None
    for i, f in enumerate(forwards):
        if f.info.kind != "step" or f.info.step != 0:
            continue
        before = forwards[i - 1] if i > 0 else None
        if first_step is not None and before is not None and before.info.kind == "commit" \
                and before.info.block == f.info.block - 1 == first_step.info.block:
            yield first_step, before, f
        first_step = f


def score(forwards: list[ForwardRecord]) -> dict[str, GuessScore]:
    """{"layer": the next-layer guess, "step": the next-ranked guess} over consecutive steps,
    and {"block": the previous block's first step} over block starts."""
    out = {"layer": GuessScore(), "step": GuessScore(), "block": GuessScore()}
    for first, before, cur in _block_starts(forwards):
        for j, rec in cur.layers.items():
            if j in first.layers and j in before.layers:
                out["block"].add(_used(first.layers[j]), _used(rec), _used(before.layers[j]))
    for prev, cur in _steps(forwards):
        for j, rec in cur.layers.items():
            if j not in prev.layers:
                continue
            before = set(prev.layers[j].ids.ravel().tolist())
            used = set(rec.ids.ravel().tolist())
            out["step"].add(set(prev.layers[j].next_ranked.ravel().tolist()), used, before)
            up = cur.layers.get(j - 1)
            if j > 0 and up is not None and up.guess_next_layer is not None:
                out["layer"].add(set(up.guess_next_layer.ravel().tolist()), used, before)
    return out


def score_drifting(gen, *, blocks: int, steps: int, ranked: int) -> GuessScore:
    """The step guess on the drifting synthetic workload (bench/drift.py `DriftingScores`):
    each token's `ranked` experts just below its top-k at step s, scored against the experts
    each layer uses at step s+1 and not at s, over `steps` steps of `blocks` blocks."""
    out = GuessScore()
    k = gen.k
    for b in range(blocks):
        for s in range(steps - 1):
            below = gen.ranked(b, s, k + ranked)[..., k:]
            now, nxt = gen.step(b, s), gen.step(b, s + 1)
            for j in range(now.shape[0]):
                out.add(set(below[j].ravel().tolist()), set(nxt[j].ravel().tolist()),
                        set(now[j].ravel().tolist()))
    return out
