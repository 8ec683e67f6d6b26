"""A guess of a denoising step's experts from the step before: each position's experts ranked
best by the router at step t — its top k and the `below` ranked just under them — for step
t+1 of the same block. Diffusion steps change few tokens, so a layer's routing drifts slowly
from step to step, and what enters it next is most often what ranked just below the choice.

The captured step writes the ranks into a fixed buffer per block length (`observe`, run by
the model's own routing in a step program when the expert runtime reads steps ahead); the
host reads it before the next step (`guess`). At a block's first step there is no guess: its
positions were all masks, unlike the block before's. Nothing computed depends on a guess.
"""

from __future__ import annotations

import numpy as np
import torch

from tidecli.model.config import ModelConfig
from tidecli.model.moe import ForwardInfo
from tidecli.model.router import biased, router_scores
from tidecli.model.weights import RouterWeights

BELOW = 2  # experts per position read beyond its choice


class StepRanks:
    def __init__(self, cfg: ModelConfig, device: torch.device, *, below: int = BELOW) -> None:
        self.cfg = cfg
        self.device = device
        self.width = min(cfg.num_experts_per_tok + below, cfg.num_experts)
        self._buf: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # T → (device, host)
        self._now: tuple[int, int] | None = None  # (block, step) of the step begun
        self._prev: tuple[int, int] | None = None  # that of the forward before, if a step
        self._tokens = 0

    def begin(self, info: ForwardInfo, tokens: int) -> None:
        self._prev = self._now
        self._now = (info.block, info.step) if info.kind == "step" else None
        self._tokens = tokens

    def observe(self, moe_index: int, x: torch.Tensor, w: RouterWeights) -> None:
        """Device: MoE layer `moe_index`'s ranks for this forward's positions `x` [T, H]."""
        t = x.shape[0]
        pair = self._buf.get(t)
        if pair is None:  # made on a step program's first (uncaptured) run
            shape = (self.cfg.num_moe_layers, t, self.width)
            pair = self._buf[t] = (
                torch.zeros(shape, dtype=torch.long, device=self.device),
                torch.zeros(shape, dtype=torch.long,
                            pin_memory=self.device.type == "cuda"))
        ranks = biased(router_scores(x, w), w).topk(self.width, dim=-1).indices
        pair[0][moe_index].copy_(ranks)

    def guess(self) -> np.ndarray | None:
        """Host, as a step begins: [M, T, width] the ranks of the step just before it in the
        same block, or None (a block's first step; no step before)."""
        now, prev = self._now, self._prev
        pair = self._buf.get(self._tokens)
        if now is None or prev is None or pair is None or prev != (now[0], now[1] - 1):
            return None
        pair[1].copy_(pair[0])  # a few KB; the device has finished the step before
        return pair[1].numpy()
