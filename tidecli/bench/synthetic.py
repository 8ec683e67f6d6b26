"""A synthetic routing workload with the published statistics of LLaDA2.0-mini.

Benchmarks only. Random synthetic weights route differently from trained ones (a random router
spreads a step's tokens over more experts, and its choices drift differently), so for a
realistic load the router's expert choice is replaced, per MoE layer and step, by this model
(the router's weights are kept):

- each block draws, per layer, a pool of `pool` experts (half of the previous block's pool kept)
  with Zipf-like popularity; each token of the block gets k distinct experts from the pool;
- each denoising step re-draws a share `churn` of the (token, slot) choices (a draw that would
  repeat one of the token's experts is dropped).

With the defaults a 32-token step of a 256-expert top-8 layer uses ≈ 70 distinct experts, and a
layer's expert counts have a cosine similarity ≈ 0.985 one step apart and ≈ 0.95 five steps
apart, the figures published for real LLaDA2.0-mini. The choices depend only on (seed, block,
step, layer), so every policy sees the same routing and must give the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from tidecli.model.config import ModelConfig
from tidecli.model.llada2 import ForwardInfo


class SyntheticRouting:
    label = "synthetic (published LLaDA2.0-mini statistics)"

    def __init__(self, cfg: ModelConfig, *, device: torch.device, block_length: int = 32,
                 seed: int = 0, pool_share: float = 0.375, zipf: float = 1.05,
                 churn: float = 0.4) -> None:
        self.cfg = cfg
        self.E, self.k = cfg.num_experts, cfg.num_experts_per_tok
        self.M = cfg.num_moe_layers
        self.T = block_length
        self.seed = seed
        self.pool_size = max(self.k + 1, min(self.E, round(pool_share * self.E)))
        p = 1.0 / np.arange(1, self.pool_size + 1) ** zipf
        self.p = p / p.sum()
        self.churn = churn
        self.device = device
        cuda = device.type == "cuda"
        self._host = torch.zeros((self.M, block_length, self.k), dtype=torch.long,
                                 pin_memory=cuda)
        self._dev = torch.zeros((self.M, block_length, self.k), dtype=torch.long, device=device)
        self._copied: torch.cuda.Event | None = None
        self._chain: list[np.ndarray] = []  # pools of blocks 0, 1, ...
        self._pools: np.ndarray | None = None  # [M, pool] of the current block
        self._assign: np.ndarray | None = None  # [M, T, k]
        self._at: tuple[int, int] | None = None  # (block, step) of _assign
        self._current = self._dev  # what ids() hands out for the forward in progress

    def describe(self) -> dict:
        return {"workload": "synthetic", "pool": self.pool_size, "churn": self.churn,
                "seed": self.seed}

    # ---- the model ------------------------------------------------------------------------------

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _pools_of(self, block: int) -> np.ndarray:
        """The expert pools [M, pool] of a block: a pure function of (seed, block), each block
        keeping half of the previous block's pool."""
        while len(self._chain) <= block:
            b = len(self._chain)
            rng = self._rng(1, b)
            pools = np.empty((self.M, self.pool_size), dtype=np.int64)
            for j in range(self.M):
                if b == 0:
                    pools[j] = rng.permutation(self.E)[: self.pool_size]
                    continue
                keep = rng.permutation(self._chain[b - 1][j])[: self.pool_size // 2]
                rest = np.setdiff1d(np.arange(self.E), keep)
                fresh = rng.permutation(rest)[: self.pool_size - keep.size]
                pools[j] = rng.permutation(np.concatenate([keep, fresh]))
            self._chain.append(pools)
        return self._chain[block]

    def _draw_tokens(self, rng: np.random.Generator, pools: np.ndarray, t: int) -> np.ndarray:
        """k distinct experts per token, drawn by popularity (Gumbel top-k), every layer at once."""
        keys = np.log(self.p) + rng.gumbel(size=(self.M, t, self.pool_size))
        top = np.argpartition(-keys, self.k - 1, axis=-1)[..., : self.k]
        return np.take_along_axis(pools[:, None, :], top, axis=-1)

    def _evolve(self, assign: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        change = rng.random(assign.shape) < self.churn
        drawn = rng.choice(self.pool_size, size=assign.shape, p=self.p)
        picks = self._pools[np.arange(self.M)[:, None, None], drawn]
        new = np.where(change, picks, assign)
        srt = np.sort(new, axis=-1)
        clash = (srt[..., 1:] == srt[..., :-1]).any(-1)  # a token's experts must stay distinct
        new[clash] = assign[clash]
        return new

    def _step(self, block: int, step: int) -> np.ndarray:
        if self._at is not None and self._at == (block, step):
            return self._assign
        if self._at is None or self._at[0] != block or step < self._at[1]:
            self._pools = self._pools_of(block)
            self._assign = self._draw_tokens(self._rng(2, block), self._pools, self.T)
            self._at = (block, 0)
        while self._at[1] < step:
            s = self._at[1] + 1
            self._assign = self._evolve(self._assign, self._rng(3, block, s))
            self._at = (block, s)
        return self._assign

    # ---- the model's hook -----------------------------------------------------------------------

    def begin(self, info: ForwardInfo, tokens: int) -> None:
        if tokens == self.T and info.kind in ("step", "commit"):
            if info.kind == "step":
                assign = self._step(info.block, info.step)
            else:  # the pass that writes a finished block's K/V: the block's last routing
                assign = self._assign if self._at and self._at[0] == info.block \
                    else self._step(info.block, 0)
            if self._copied is not None:
                self._copied.synchronize()  # the previous copy has left the pinned buffer
            self._host.copy_(torch.from_numpy(assign))
            self._dev.copy_(self._host, non_blocking=True)
            if self.device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record()
            self._current = self._dev
            return
        pools = self._pools if self._pools is not None else self._pools_of(0)
        draw = self._draw_tokens(self._rng(4, info.block, tokens), pools, tokens)
        self._current = torch.from_numpy(draw).to(self.device)

    def ids(self, j: int, tokens: int) -> torch.Tensor:
        """The expert choice of MoE layer j (index among MoE layers) for this forward: [t, k]."""
        out = self._current[j]
        assert out.shape[0] == tokens, "begin() was not called for this forward"
        return out

    def static_ids(self, j: int) -> torch.Tensor:
        """The buffer a block-length step reads (captured step programs hold its address)."""
        return self._dev[j]
