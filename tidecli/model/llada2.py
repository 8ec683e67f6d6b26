"""The LLaDA2 forward pass with a block KV cache, and the slow reference path beside it.

Blocks of `block` positions are aligned to position 0. A query in block b sees every key in blocks
≤ b, so the K/V of a finished block never change: the cache holds them, and a denoising step runs
only the current block against the cached prefix. The reference path recomputes the whole window
with the block-causal mask on every call; tests hold the cached path to it.

A layer is written once, in parts (`attention_part`, `dense_part`, `route`, `expert_part`,
`shared_part`, `residual`), in dataflow order; the eager paths here and the captured step program
(model/program.py) both run those parts.
"""

from __future__ import annotations

import torch

from tidecli.model.config import ModelConfig
from tidecli.model.layers import Rotary, attend, block_causal_mask, rms_norm
from tidecli.model.moe import ExpertRuntime, ForwardInfo, Router
from tidecli.model.parts import EAGER, LayerFns, residual
from tidecli.model.stepranks import StepRanks
from tidecli.model.weights import DenseWeights


class KVCache:
    """Per-layer K and V for `capacity` positions, preallocated once per generation."""

    def __init__(self, cfg: ModelConfig, capacity: int, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (cfg.num_hidden_layers, capacity, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: the captured step reads (and masks) keys not written yet, and
        # uninitialised memory could hold NaN, which a mask does not cancel
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class LLaDA2Model:
    def __init__(self, cfg: ModelConfig, weights: DenseWeights, experts: ExpertRuntime | None, *,
                 device: torch.device, dtype: torch.dtype, block_length: int = 32,
                 router: Router | None = None) -> None:
        self.cfg = cfg
        self.w = weights
        self.experts = experts
        self.device = device
        self.dtype = dtype
        self.block = block_length  # the default block of the block-causal mask
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.max_position_embeddings, device)
        self.router = router or Router()
        self.ranks = StepRanks(cfg, device)  # the model's own guess of a step's experts
        self.moe_index = {layer: j for j, layer in enumerate(cfg.moe_layers)}
        moe = list(cfg.moe_layers)
        self.next_moe = dict(zip(moe, moe[1:], strict=False))  # MoE layer → the next one
        self._cache: KVCache | None = None

    def cache_for(self, positions: int, *, round_to: int = 512) -> KVCache:
        """A KV cache for `positions`; kept and reused across generations (captured programs
        hold its address), grown when a longer one is needed."""
        if self._cache is None or self._cache.capacity < positions:
            cap = -(-positions // round_to) * round_to
            cap = min(max(cap, positions), self.cfg.max_position_embeddings)
            self._cache = None
            self._cache = KVCache(self.cfg, cap, device=self.device, dtype=self.dtype)
        return self._cache

    # ---- one layer, in parts --------------------------------------------------------------------

    def begin_forward(self, info: ForwardInfo, tokens: int) -> None:
        self.router.begin(info, tokens)
        self.ranks.begin(info, tokens)
        self.experts.begin_forward(info)
        if info.kind == "step" and self.experts.prefetches_steps:  # asked only when it reads
            self.experts.prefetch_step(self.ranks.guess if self.own_routing
                                       else self.router.step_guess)

    @property
    def own_routing(self) -> bool:
        """The checkpoint's router chooses the experts (not a benchmark's workload)."""
        return type(self.router).__call__ is Router.__call__

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w.embed
        rows = table[ids.to(table.device)]
        return rows.to(self.device, dtype=self.dtype, non_blocking=True)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's (cos, sin) for a forward pass's positions: every layer reads the same pair."""
        return self.rotary.tables(positions, self.dtype)

    def attention_part(self, i: int, x: torch.Tensor, positions: torch.Tensor, *,
                       kv: tuple[torch.Tensor, torch.Tensor] | None, kv_start: int | None,
                       mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                       fns: LayerFns = EAGER) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm attention with its residual: (h, the FFN's normed input)."""
        cfg, lw = self.cfg, self.w.layers[i]
        a = lw.attn
        q, k, v = fns.attention_in(x, lw.input_norm, a.qkv, a.q_norm, a.k_norm, *rope,
                                   eps=cfg.rms_norm_eps, num_heads=cfg.num_attention_heads,
                                   num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
        out = attend(q, k, v, positions=positions, kv=kv, kv_start=kv_start, mask=mask)
        return fns.attention_out(x, out, a.dense, lw.post_norm, cfg.rms_norm_eps)

    def dense_part(self, i: int, h: torch.Tensor, n: torch.Tensor, *,
                   fns: LayerFns = EAGER) -> torch.Tensor:
        """A dense layer's FFN with its residual (layers < first_k_dense_replace)."""
        w = self.w.layers[i].dense_ffn
        return fns.residual(h, fns.ffn(n, w.gate_up, w.down), None)

    def route(self, i: int, n: torch.Tensor, *, static: bool = False, fns: LayerFns = EAGER):
        """A MoE layer's expert ids [T, k] and weights [T, k] (fp32)."""
        w = self.w.layers[i].router
        if self.own_routing:
            out = fns.route(n, w, self.cfg)
            if static and self.experts.prefetches_steps:  # a step program: guess the next
                self.ranks.observe(self.moe_index[i], n, w)
            return out
        return self.router(self.moe_index[i], n, w, self.cfg, static=static)

    def predict(self, i: int, n: torch.Tensor, *, static: bool = False) -> torch.Tensor:
        """A guess of MoE layer i's expert ids [T, k] from `n`, an earlier layer's normed input:
        its router applied to `n`, unless the run's router guesses otherwise (Router.guess)."""
        return self.router.guess(self.moe_index[i], n, self.w.layers[i].router, self.cfg,
                                 static=static)

    def expert_part(self, i: int, n: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
        return self.experts.run(i, n, ids, weights)

    def shared_part(self, i: int, n: torch.Tensor, *,
                    fns: LayerFns = EAGER) -> torch.Tensor | None:
        shared = self.w.layers[i].shared
        return fns.ffn(n, shared.gate_up, shared.down) if shared is not None else None

    def layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, *,
              cache: KVCache | None, start: int | None, mask: torch.Tensor | None,
              rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, n = self.attention_part(i, x, positions,
                                   kv=cache.layer(i) if cache is not None else None,
                                   kv_start=start, mask=mask, rope=rope)
        if self.w.layers[i].dense_ffn is not None:
            return self.dense_part(i, h, n)
        ids, weights = self.route(i, n)
        nxt = self.next_moe.get(i)
        if nxt is not None and self.experts.prefetches:
            self.experts.prefetch(nxt, self.predict(nxt, n))
        y = self.expert_part(i, n, ids, weights)
        return residual(h, y, self.shared_part(i, n))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head; logits in fp32."""
        x = rms_norm(x, self.w.norm, self.cfg.rms_norm_eps)
        return torch.nn.functional.linear(x, self.w.lm_head).float()

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, *, cache: KVCache | None,
                start: int, mask: torch.Tensor | None) -> torch.Tensor:
        rope = self.rope(positions)
        for i in range(self.cfg.num_hidden_layers):
            x = self.layer(i, x, positions, cache=cache, start=start, mask=mask, rope=rope)
        return x

    # ---- the cached path ------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: KVCache, info: ForwardInfo, *,
                block_length: int | None = None) -> None:
        """Write the K/V of whole blocks ids[0:n] (n a multiple of the block length)."""
        n = ids.shape[0]
        if n == 0:
            return
        positions = torch.arange(n, device=self.device)
        mask = block_causal_mask(positions, positions, block_length or self.block)
        self.begin_forward(info, n)
        self._layers(self.embed(ids), positions, cache=cache, start=0, mask=mask)
        self.experts.end_forward()

    @torch.inference_mode()
    def block_forward(self, ids: torch.Tensor, start: int, cache: KVCache, info: ForwardInfo,
                      *, rows: torch.Tensor | None = None, logits: bool = True,
                      ids_host: list[int] | None = None) -> torch.Tensor | None:
        """Run the block at positions start..start+len(ids) against the cached prefix.

        Writes this block's K/V at its positions (a scratch area until the block is final: the
        commit pass, run on the finished block, leaves the clean K/V there). Logits only for
        `rows` of the block when given (the positions the decoder will look at). `ids_host` (the
        block's tokens as a list) is for the step program; the eager path does not need it.
        """
        t = ids.shape[0]
        positions = torch.arange(start, start + t, device=self.device)
        self.begin_forward(info, t)
        x = self._layers(self.embed(ids), positions, cache=cache, start=start, mask=None)
        out = self.head(x if rows is None else x[rows]) if logits else None
        self.experts.end_forward()
        return out

    # ---- the reference path ---------------------------------------------------------------------

    @torch.inference_mode()
    def reference_logits(self, ids: torch.Tensor, rows: torch.Tensor, info: ForwardInfo, *,
                         block_length: int | None = None) -> torch.Tensor:
        """Slow and obvious: the whole window, block-causal mask, no cache. `rows` are absolute
        positions whose logits are returned."""
        n = ids.shape[0]
        positions = torch.arange(n, device=self.device)
        mask = block_causal_mask(positions, positions, block_length or self.block)
        self.begin_forward(info, n)
        x = self._layers(self.embed(ids), positions, cache=None, start=0, mask=mask)
        out = self.head(x[rows])
        self.experts.end_forward()
        return out
