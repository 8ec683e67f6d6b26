"""The seam between the model and whatever computes its routed experts.

A MoE layer hands an expert runtime `(layer, hidden [T, H], expert ids [T, k], weights [T, k])`
and gets the weighted sum of the routed experts `[T, H]` back. The runtime decides where each
expert runs; it never changes which experts a token uses, nor their weights. The decoder tells
the model where it is (`ForwardInfo`), the model passes it on; nothing else flows backwards.

For the captured step program (model/program.py) the same work is split into phases:
`device_begin` (device only: resident experts → per-pair rows), the host phases `host_before` /
`host_after` (routing on the host, promotions, CPU misses, which write rows into an override
buffer), and `device_end` (device only: take the override rows); the model weights and sums the
rows (`parts.moe_out`). `run` is these phases in order, summed. A runtime whose step needs no
host phase says so (`needs_host` False) and gets the whole step as one graph.

Routing can be replaced from outside (benchmarks replay a synthetic workload): a `Router` gets
told where each forward pass is and picks the experts of each MoE layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from tidecli.model.config import ModelConfig
from tidecli.model.counters import ExpertStats
from tidecli.model.router import predict, route
from tidecli.model.weights import RouterWeights


@dataclass(frozen=True)
class ForwardInfo:
    """Where the decoder is; expert runtimes use it to time refreshes. Nothing flows back."""

    kind: str  # "prefill" | "step" | "commit" | "reference"
    block: int = 0  # index of the block being decoded
    step: int = 0  # denoising step inside the block (restarts at 0 each block)
    last_step: bool = False  # the decoder knows this step finishes the block


@dataclass
class LayerIO:
    """One MoE layer's routing and input, on the device and (once `wait` returns) on the host."""

    ids: torch.Tensor  # [T, k] device
    hidden: torch.Tensor  # [T, H] device
    host_ids: torch.Tensor | None = None  # pinned copies filled by a D2H copy already queued
    host_x: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # recorded after that copy
    _np: np.ndarray | None = None

    def wait(self) -> np.ndarray:
        if self._np is None:
            if self.host_ids is None:  # CPU device: nothing to copy
                self.host_ids, self.host_x = self.ids, self.hidden
            elif self.ready is not None:
                self.ready.synchronize()
            self._np = self.host_ids.numpy()
        return self._np


class ExpertRuntime(Protocol):
    """What the model needs from an expert runtime (experts/ implements it)."""

    needs_host: bool  # host phases between the device phases (no single-graph step)
    prefetches: bool  # takes guesses of a layer's experts before its router runs (`prefetch`)
    prefetches_steps: bool  # takes a guess of a step's experts before the step runs
    forward_stats: ExpertStats  # counters of the forward pass in progress (or last finished)

    def begin_forward(self, info: ForwardInfo) -> None: ...

    def end_forward(self) -> ExpertStats: ...

    def run(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor: ...

    def make_io(self, ids: torch.Tensor, hidden: torch.Tensor) -> LayerIO: ...

    def device_begin(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """Device only: `ids` [T, k] guess layer's experts; the runtime may start reading them.
        Queued before the layer's own routing exists (on a side stream on a GPU); a wrong guess
        may cost copies, never a different result."""

    def prefetch_step(self, guess: Callable[[], np.ndarray | None]) -> None:
        """Host, after begin_forward of a denoising step: `guess()` gives [M, T, n] its likely
        experts (or None); the runtime asks only when it will read them ahead (a refresh, the
        read-ahead on). A wrong guess may cost copies, never a result."""

    def host_before(self, layer: int, io: LayerIO) -> None: ...

    def host_after(self, layer: int, io: LayerIO, pair_out: torch.Tensor,
                   over: torch.Tensor | None, over_mask: torch.Tensor | None) -> None: ...

    def device_end(self, layer: int, pair_out: torch.Tensor, over: torch.Tensor | None,
                   over_mask: torch.Tensor | None) -> torch.Tensor: ...


class Router:
    """The model's own routing (model/router.py). Subclasses may replace the expert choice
    (never the weights' computation) for benchmarks; `static` asks for ids in a buffer whose
    address never changes (a captured step reads it every replay)."""

    def begin(self, info: ForwardInfo, tokens: int) -> None:
        """A forward pass of `tokens` tokens starts."""

    def __call__(self, moe_index: int, x: torch.Tensor, w: RouterWeights, cfg: ModelConfig, *,
                 static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return route(x, w, cfg)

    def guess(self, moe_index: int, x: torch.Tensor, w: RouterWeights, cfg: ModelConfig, *,
              static: bool = False) -> torch.Tensor:
        """A guess [T, k] of MoE layer `moe_index`'s expert ids before its router runs (the
        read-ahead's): `w`, that layer's router, applied to `x`, an earlier layer's normed
        input. Benchmark workloads that know the routing ahead may guess otherwise."""
        return predict(x, w, cfg)

    def step_guess(self) -> np.ndarray | None:
        """After `begin` of a denoising step: a guess [M, T, n] of its expert ids on the host,
        for a read-ahead before it runs, or None. Asked only of a benchmark's workload: the
        model's own routing is guessed from the step before (model/stepranks.py)."""
        return None
