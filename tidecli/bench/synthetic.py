"""A synthetic routing workload with the published statistics of LLaDA2.0-mini.

Benchmarks only. Random synthetic weights route differently from trained ones (a random router
spreads a step's tokens over more experts, and its choices drift differently), so for a
realistic load the router's expert choice is replaced, per MoE layer and step, by the
generative model of planner/published.py (the router's weights are kept). With the defaults a
32-token step of a 256-expert top-8 layer uses ≈ 70 distinct experts, and a layer's expert
counts have a cosine similarity ≈ 0.985 one step apart and ≈ 0.95 five steps apart, the figures
published for real LLaDA2.0-mini. The choices depend only on (seed, block, step, layer), so
every policy sees the same routing and must give the same tokens. For a block-routed model
(LLaDA2.2) each routing window's pool holds at most its `expert_capacity` experts.

The read-ahead's guess (`--prefetch layer` or `step`) can be set to a known accuracy
(`guess_accuracy`): each of a token's k guessed experts is its real choice with that
probability, otherwise an expert the token did not choose: one at random, or (`guess_misses =
"ranked"`, drifting workload) the expert its scores rank just below its choice, the near miss
a router applied to a nearby input makes. The bench uses it to measure what the read-ahead
gives with a predictor as good as a trained model's, which random weights cannot show.
"""

from __future__ import annotations

import numpy as np
import torch

from tidecli.bench.drift import DriftingScores
from tidecli.model.config import ModelConfig
from tidecli.model.moe import ForwardInfo, Router
from tidecli.model.router import route
from tidecli.model.stepranks import BELOW
from tidecli.model.weights import RouterWeights
from tidecli.planner.published import PublishedRouting


class SyntheticRouting(PublishedRouting, Router):
    label = "synthetic (published LLaDA2.0-mini statistics)"
    has_scores = False  # the workload's choice is the top-k of scores it can rank below

    def __init__(self, cfg: ModelConfig, *, device: torch.device, block_length: int = 32,
                 seed: int = 0, pool_share: float = 0.375, zipf: float = 1.05,
                 churn: float = 0.4) -> None:
        super().__init__(num_experts=cfg.num_experts, experts_per_token=cfg.num_experts_per_tok,
                         num_layers=cfg.num_moe_layers, block_length=block_length, seed=seed,
                         pool_share=pool_share, zipf=zipf, churn=churn,
                         capacity=cfg.expert_capacity, window=cfg.block_size)
        self.cfg = cfg
        self.device = device
        cuda = device.type == "cuda"
        # [0]: the expert choice of a block-length forward, [1]: the read-ahead's guess of it
        self._host = torch.zeros((2, self.M, block_length, self.k), dtype=torch.long,
                                 pin_memory=cuda)
        self._dev = torch.zeros((2, self.M, block_length, self.k), dtype=torch.long,
                                device=device)
        self._copied: torch.cuda.Event | None = None
        self._current = self._dev  # what ids() and guess() hand out for the forward in progress
        # None: the read-ahead guesses with the model's router (Router.guess); a share in [0, 1]:
        # with the routing itself, that share of each token's experts right (set per run)
        self.guess_accuracy: float | None = None
        self.guess_misses = "random"  # a wrong guess: "random", or "ranked" (drifting only)
        # drawn routing by (block, step), and the [2, M, T, k] pairs a forward copies, by
        # ((block, step), kind, accuracy); the last step forward begun (its block's commit
        # pass takes its routing)
        self._choices: dict[tuple[int, int], np.ndarray] = {}
        self._pairs: dict[tuple, torch.Tensor] = {}
        self._prepared_for: tuple[float | None, str] = (None, "random")
        self._last_step: tuple[int, int] | None = None
        self._stepping = False  # the forward begun is a block-length denoising step
        # without a set accuracy, `--prefetch step` guesses each step from the one before (the
        # workload's own ranks, where it has scores: drifting), drawn ahead as the routing is
        self.predict_steps = False
        self._ranks: dict[tuple[int, int], np.ndarray] = {}

    def describe(self) -> dict:
        return {"workload": "synthetic", "pool": self.pool_size, "churn": self.churn,
                "seed": self.seed}

    # ---- the model's router ---------------------------------------------------------------------

    def begin(self, info: ForwardInfo, tokens: int) -> None:
        self._stepping = tokens == self.T and info.kind == "step"
        if tokens == self.T and info.kind in ("step", "commit"):
            if info.kind == "step":
                at = self._last_step = (info.block, info.step)
            else:  # the pass that writes a finished block's K/V: the block's last routing
                last = self._last_step
                at = last if last is not None and last[0] == info.block else (info.block, 0)
            pair = self._prepared(at, info.kind)
            if self._copied is not None:
                self._copied.synchronize()  # the previous copy has left the pinned buffer
            self._host.copy_(pair)
            self._dev.copy_(self._host, non_blocking=True)
            if self.device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record()
            self._current = self._dev
            return
        # a prefill: tokens drawn from the block's pools (a pure function of seed and block)
        draw = self._draw_tokens(self._rng(4, info.block, tokens), self._pools_of(info.block),
                                 tokens)
        guess = self._guess_of(draw, (8, info.block, tokens)) \
            if self.guess_accuracy is not None else draw
        self._current = torch.from_numpy(np.stack([draw, guess])).to(self.device)

    def prepare(self, blocks: int, steps: int) -> None:
        """Compute ahead the routing (and the guess) of steps 0..steps-1 of blocks 0..blocks-1
        and of their commit passes: drawing a step costs the host 2-3 ms of numpy, 3 more with
        the guess (profiler trace on an H200 host), which a timed step would otherwise count
        while the GPU waits. A step not prepared is drawn when it comes; the routing is the
        same either way."""
        for b in range(blocks):
            for st in range(steps):
                for kind in ("step", "commit"):
                    self._prepared((b, st), kind)
                if self.predict_steps and self.has_scores and st > 0:
                    self._step_ranks((b, st))

    def _prepared(self, at: tuple[int, int], kind: str) -> torch.Tensor:
        """[2, M, T, k]: the choice at (block, step) and the read-ahead's guess of it for a
        forward of `kind` (the choice again when no accuracy is set), drawn once."""
        if self._prepared_for != (self.guess_accuracy, self.guess_misses):  # another run's
            self._pairs = {key: v for key, v in self._pairs.items() if key[2] is None}
            self._prepared_for = (self.guess_accuracy, self.guess_misses)
        key = (at, kind if self.guess_accuracy is not None else None, self.guess_accuracy)
        pair = self._pairs.get(key)
        if pair is None:
            assign = self._choices.get(at)
            if assign is None:
                assign = self._choices[at] = np.array(self.step(*at), dtype=np.int64)
            guess = assign
            if self.guess_accuracy is not None:
                seed = (7, at[0], at[1] + 1 if kind == "step" else 0)
                guess = self._guess_of(assign, seed, at=at)
            pair = self._pairs[key] = torch.from_numpy(np.stack([assign, guess]))
        return pair

    def _guess_of(self, assign: np.ndarray, key: tuple[int, ...],
                  at: tuple[int, int] | None = None) -> np.ndarray:
        """The read-ahead's guess [M, t, k] of the choice `assign` (of the step `at`, when a
        step): each entry kept with probability `guess_accuracy`, otherwise replaced by an
        expert its token did not choose (distinct within the token; another token may still
        use it): at random, or with `guess_misses = "ranked"` the token's experts ranked just
        below its choice at that step, in rank order (a prefill's misses stay random). A pure
        function of (seed, key, at)."""
        rng = self._rng(*key)
        keys = rng.random((*assign.shape[:2], self.E))
        np.put_along_axis(keys, assign, np.inf, axis=-1)  # never one of the token's own
        other = np.argpartition(keys, self.k - 1, axis=-1)[..., : self.k]
        if self.guess_misses == "ranked" and at is not None:
            other = self.ranked(*at, 2 * self.k)[..., self.k:]
        right = rng.random(assign.shape) < self.guess_accuracy
        return np.where(right, assign, other)

    def step_guess(self) -> np.ndarray | None:
        """The guess of the step begun (`--prefetch step`): with an accuracy set, [M, T, k] the
        same guess the layer read-ahead gets, known before the step runs; otherwise, on a
        workload with scores, the step before's ranks."""
        if not self._stepping:
            return None
        if self.guess_accuracy is not None:
            return self._host[1].numpy()
        at = self._last_step
        if self.predict_steps and self.has_scores and at is not None and at[1] > 0:
            return self._step_ranks(at)
        return None

    def _step_ranks(self, at: tuple[int, int]) -> np.ndarray:
        """[M, T, k + BELOW] each token's best experts at the step before `at` (its choice and
        those just below): the model's own guess (model/stepranks.py) on this workload."""
        out = self._ranks.get(at)
        if out is None:
            out = self._ranks[at] = np.ascontiguousarray(
                self.ranked(at[0], at[1] - 1, self.k + BELOW))
        return out

    def __call__(self, moe_index: int, x: torch.Tensor, w: RouterWeights, cfg: ModelConfig, *,
                 static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's weights for its own choice, and the workload's expert choice of MoE
        layer `moe_index` for this forward [t, k]: in a static program the buffer a block-length
        step reads (its address is captured)."""
        _ids, weights = route(x, w, cfg)
        return (self._dev[0, moe_index] if static else self.ids(moe_index, x.shape[0])), weights

    def guess(self, moe_index: int, x: torch.Tensor, w: RouterWeights, cfg: ModelConfig, *,
              static: bool = False) -> torch.Tensor:
        if self.guess_accuracy is None:
            return super().guess(moe_index, x, w, cfg, static=static)
        if static:
            return self._dev[1, moe_index]
        out = self._current[1, moe_index]
        assert out.shape[0] == x.shape[0], "begin() was not called for this forward"
        return out

    def ids(self, moe_index: int, tokens: int) -> torch.Tensor:
        """The expert choice of MoE layer `moe_index` for this forward: [tokens, k]."""
        out = self._current[0, moe_index]
        assert out.shape[0] == tokens, "begin() was not called for this forward"
        return out


class DriftingRouting(SyntheticRouting, DriftingScores):
    """The same replay with bench/drift.py's routing: the top-k of slowly drifting scores,
    fitted to the same published figures; the experts that enter a step are mostly those ranked
    just below the top-k, as with a trained router."""

    label = "drifting (top-k of drifting scores, published LLaDA2.0-mini statistics)"
    has_scores = True

    def describe(self) -> dict:
        return {"workload": "drifting", "pool": self.pool_size, "sigma": self.sigma,
                "speed": self.speed, "rho": self.rho, "seed": self.seed}
