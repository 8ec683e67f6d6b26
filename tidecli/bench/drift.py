"""A second synthetic routing: the top-k of slowly drifting per-token router scores (numpy only).

The published workload (planner/published.py) re-draws a share of the (token, slot) choices each
step at random, so the experts that enter a step cannot be foreseen, and a predictor of the next
step's experts could never pay on it. A trained router is not like that: its scores move a
little per step, and the experts that enter are mostly those ranked just below the top-k. Here
each token has a score per expert of the block's pool, and its experts are the top-k of
    log p (the pool's Zipf popularity) + sigma · (z_t + speed · t · v)
where z_t is an AR(1) process (rho per step) and v a fixed direction per token and block: a
jitter and a steady drift. The defaults reproduce the same three published figures as the
published workload (tests/test_bench.py): ≈ 70 distinct experts of 256 (top-8) per 32-token
step, count similarity ≈ 0.985 one step apart and ≈ 0.95 five apart. The pools come from the
published model (half kept from block to block, capped by block routing's capacity). The
choices depend only on (seed, block, step, layer).
"""

from __future__ import annotations

import numpy as np

from tidecli.planner.published import PublishedRouting


class DriftingScores(PublishedRouting):
    def __init__(self, *, sigma: float = 0.95, speed: float = 0.18, rho: float = 0.95,
                 **published) -> None:
        super().__init__(**published)
        self.sigma, self.speed, self.rho = sigma, speed, rho
        self._z: np.ndarray | None = None  # [M, T, pool] the jitter at the current step
        self._v: np.ndarray | None = None  # [M, T, pool] the block's drift directions

    def scores(self, block: int, step: int) -> np.ndarray:
        """[M, T, pool] every token's scores over its window's pool at a block's step."""
        if self._at is None or self._at[0] != block or step < self._at[1]:
            self._pools = self._pools_of(block)
            rng = self._rng(5, block)
            self._z = rng.standard_normal((self.M, self.T, self.pool_size))
            self._v = rng.standard_normal((self.M, self.T, self.pool_size))
            self._at, self._assign = (block, 0), None
        while self._at[1] < step:
            s = self._at[1] + 1
            jitter = self._rng(6, block, s).standard_normal(self._z.shape)
            self._z = self.rho * self._z + np.sqrt(1.0 - self.rho ** 2) * jitter
            self._at, self._assign = (block, s), None
        return np.log(self.p) + self.sigma * (self._z + self.speed * step * self._v)

    def step(self, block: int, step: int) -> np.ndarray:
        """The expert choice [M, T, k] of every layer at a block's denoising step."""
        if self._at == (block, step) and self._assign is not None:
            return self._assign
        score = self.scores(block, step)
        top = np.argpartition(-score, self.k - 1, axis=-1)[..., : self.k]
        self._assign = np.take_along_axis(self._pools[:, self._windows(self.T), :], top, axis=-1)
        return self._assign

    def ranked(self, block: int, step: int, n: int) -> np.ndarray:
        """[M, T, n] each token's n best experts at a step, best first (n ≥ k: the top-k and
        those ranked just below it, what a next-step predictor would read early)."""
        score = self.scores(block, step)
        order = np.argsort(-score, axis=-1, kind="stable")[..., :n]
        return np.take_along_axis(self._pools[:, self._windows(self.T), :], order, axis=-1)
