"""The published routing statistics of LLaDA2.0-mini as a generative model (numpy only).

Real trained routing is not available here, and the papers publish only three figures: ≈ 70
distinct experts of 256 (top-8) per layer for a 32-token step, and a cosine similarity of a
layer's expert counts of ≈ 0.985 one step apart and ≈ 0.95 five steps apart. This model draws
routing with those figures:
- each block draws, per layer, a pool of `pool` experts (half of the previous block's pool kept)
  with Zipf-like popularity; each token of the block gets k distinct experts from the pool;
- each denoising step re-draws a share `churn` of the (token, slot) choices (a draw that would
  repeat one of the token's experts is dropped).
With block routing (LLaDA2.2: `capacity` experts per routing window of `window` tokens) each
window of a block draws its own pool of at most `capacity` experts, so a step never uses more
than capacity × windows experts per layer, as the real router guarantees.
The choices depend only on (seed, block, step, layer). The benchmark replays it in place of the
router (bench/synthetic.py), and the planner's default routing statistics are measured on it
(planner/stats.py: `published_stats`), so the two agree by construction.
"""

from __future__ import annotations

import numpy as np


class PublishedRouting:
    def __init__(self, *, num_experts: int, experts_per_token: int, num_layers: int,
                 block_length: int = 32, seed: int = 0, pool_share: float = 0.375,
                 zipf: float = 1.05, churn: float = 0.4, capacity: int = 0,
                 window: int = 0) -> None:
        self.E, self.k, self.M = num_experts, experts_per_token, num_layers
        self.T = block_length
        self.seed = seed
        self.pool_size = max(self.k + 1, min(self.E, round(pool_share * self.E)))
        self.W, self.window = 1, block_length  # routing windows per block, tokens per window
        if capacity > 0:
            self.pool_size = max(self.k, min(self.pool_size, capacity))
            self.window = min(window or block_length, block_length)
            self.W = max(1, block_length // self.window)
        p = 1.0 / np.arange(1, self.pool_size + 1) ** zipf
        self.p = p / p.sum()
        self.churn = churn
        self._chain: list[np.ndarray] = []  # pools [M, W, pool] of blocks 0, 1, ...
        self._pools: np.ndarray | None = None  # [M, W, pool] of the current block
        self._assign: np.ndarray | None = None  # [M, T, k]
        self._at: tuple[int, int] | None = None  # (block, step) of _assign

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _pools_of(self, block: int) -> np.ndarray:
        """The expert pools [M, W, pool] of a block: a pure function of (seed, block), each
        window keeping half of the pool it had in the previous block."""
        while len(self._chain) <= block:
            b = len(self._chain)
            rng = self._rng(1, b)
            pools = np.empty((self.M, self.W, self.pool_size), dtype=np.int64)
            for j in range(self.M):
                for w in range(self.W):
                    if b == 0:
                        pools[j, w] = rng.permutation(self.E)[: self.pool_size]
                        continue
                    keep = rng.permutation(self._chain[b - 1][j, w])[: self.pool_size // 2]
                    rest = np.setdiff1d(np.arange(self.E), keep)
                    fresh = rng.permutation(rest)[: self.pool_size - keep.size]
                    pools[j, w] = rng.permutation(np.concatenate([keep, fresh]))
            self._chain.append(pools)
        return self._chain[block]

    def _windows(self, t: int) -> np.ndarray:
        """The routing window of each of t tokens."""
        return (np.arange(t) // self.window) % self.W

    def _draw_tokens(self, rng: np.random.Generator, pools: np.ndarray, t: int) -> np.ndarray:
        """k distinct experts per token, drawn by popularity (Gumbel top-k), every layer at once."""
        keys = np.log(self.p) + rng.gumbel(size=(self.M, t, self.pool_size))
        top = np.argpartition(-keys, self.k - 1, axis=-1)[..., : self.k]
        return np.take_along_axis(pools[:, self._windows(t), :], top, axis=-1)

    def _evolve(self, assign: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        change = rng.random(assign.shape) < self.churn
        drawn = rng.choice(self.pool_size, size=assign.shape, p=self.p)
        win = self._windows(assign.shape[1])[None, :, None]
        picks = self._pools[np.arange(self.M)[:, None, None], win, drawn]
        new = np.where(change, picks, assign)
        srt = np.sort(new, axis=-1)
        clash = (srt[..., 1:] == srt[..., :-1]).any(-1)  # a token's experts must stay distinct
        new[clash] = assign[clash]
        return new

    def step(self, block: int, step: int) -> np.ndarray:
        """The expert choice [M, T, k] of every layer at a block's denoising step."""
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


    def counts(self, block: int, step: int) -> np.ndarray:
        """[M, E] how many of the step's tokens chose each expert, per layer."""
        assign = self.step(block, step).reshape(self.M, -1)
        out = np.zeros((self.M, self.E), dtype=np.int64)
        np.add.at(out, (np.arange(self.M)[:, None], assign), 1)
        return out
