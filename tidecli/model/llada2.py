"""The LLaDA2 forward pass with a block KV cache, and the slow reference path beside it.

Blocks of `block` positions are aligned to position 0. A query in block b sees every key in blocks
≤ b, so the K/V of a finished block never change: the cache holds them, and a denoising step runs
only the current block against the cached prefix. The reference path recomputes the whole window
with the block-causal mask on every call; tests hold the cached path to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidecli.model.config import ModelConfig
from tidecli.model.layers import Rotary, attention, block_causal_mask, rms_norm, swiglu
from tidecli.model.router import route
from tidecli.model.weights import DenseWeights


@dataclass(frozen=True)
class ForwardInfo:
    """Where the decoder is; expert runtimes use it to time refreshes. Nothing flows back."""

    kind: str  # "prefill" | "step" | "commit" | "reference"
    block: int = 0  # index of the block being decoded
    step: int = 0  # denoising step inside the block (restarts at 0 each block)
    last_step: bool = False  # the decoder knows this step finishes the block


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
    def __init__(self, cfg: ModelConfig, weights: DenseWeights, experts, *,
                 device: torch.device, dtype: torch.dtype, block_length: int = 32) -> None:
        self.cfg = cfg
        self.w = weights
        self.experts = experts  # ExpertRuntime: run(layer, hidden, ids, weights) -> [T, H]
        self.device = device
        self.dtype = dtype
        self.block = block_length
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.max_position_embeddings, device)
        self.timers = None  # optional StepTimers (per-part timing for profiling)
        # Benchmarks only: replaces the router's expert choice (weights kept) with a synthetic
        # workload (bench/synthetic.py). Changes the model's output; never set for generation.
        self.routing = None
        # Steps run as a StepProgram (static shapes; CUDA graphs when `capture`) when enabled.
        self.use_program = False
        self.capture = device.type == "cuda"
        self._cache: KVCache | None = None
        self._programs: dict[int, object] = {}

    def cache_for(self, positions: int, *, round_to: int = 512) -> KVCache:
        """A KV cache for `positions`; kept and reused across generations (captured programs
        hold its address), grown when a longer one is needed."""
        if self._cache is None or self._cache.capacity < positions:
            cap = -(-positions // round_to) * round_to
            cap = min(max(cap, positions), self.cfg.max_position_embeddings)
            self._cache = None
            self._programs.clear()
            self._cache = KVCache(self.cfg, cap, device=self.device, dtype=self.dtype)
        return self._cache

    def program(self, cache: KVCache, block: int):
        from tidecli.model.program import StepProgram

        prog = self._programs.get(block)
        if prog is None or prog.cache is not cache:
            prog = StepProgram(self, cache, block, capture=self.capture)
            self._programs[block] = prog
        return prog

    def reset_programs(self) -> None:
        """Forget captured programs (after the expert runtime changed)."""
        self._programs.clear()

    # ---- building blocks ------------------------------------------------------------------------

    def _begin(self, info: ForwardInfo, tokens: int) -> None:
        if self.routing is not None:
            self.routing.begin(info, tokens)
        self.experts.begin_forward(info)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w.embed
        rows = table[ids.to(table.device)]
        return rows.to(self.device, dtype=self.dtype, non_blocking=True)

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, *, cache: KVCache | None,
                start: int, mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        tm = self.timers
        for i, lw in enumerate(self.w.layers):
            if tm:
                tm.mark("attention")
            h = x + attention(
                rms_norm(x, lw.input_norm, cfg.rms_norm_eps), lw.attn, positions=positions,
                rotary=self.rotary, num_heads=cfg.num_attention_heads,
                num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                eps=cfg.rms_norm_eps, kv=cache.layer(i) if cache is not None else None,
                kv_start=start, mask=mask)
            n = rms_norm(h, lw.post_norm, cfg.rms_norm_eps)
            if lw.dense_ffn is not None:
                if tm:
                    tm.mark("dense_ffn")
                x = h + swiglu(n, lw.dense_ffn)
                continue
            if tm:
                tm.mark("router")
            ids, weights = route(n, lw.router, cfg)
            if self.routing is not None:  # benchmarks only: a synthetic routing workload
                ids = self.routing.ids(self.experts.layer_index[i], ids.shape[0])
            if tm:
                tm.mark("experts")
            y = self.experts.run(i, n, ids, weights)
            if lw.shared is not None:
                if tm:
                    tm.mark("shared_expert")
                y = y + swiglu(n, lw.shared)
            x = h + y
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.timers:
            self.timers.mark("lm_head")
        x = rms_norm(x, self.w.norm, self.cfg.rms_norm_eps)
        return torch.nn.functional.linear(x, self.w.lm_head).float()

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
        self._begin(info, n)
        self._layers(self.embed(ids), positions, cache=cache, start=0, mask=mask)
        self.experts.end_forward()

    @torch.inference_mode()
    def block_forward(self, ids: torch.Tensor, start: int, cache: KVCache, info: ForwardInfo,
                      *, rows: torch.Tensor | None = None, logits: bool = True,
                      ids_host: list[int] | None = None) -> torch.Tensor | None:
        """Run the block at positions start..start+len(ids) against the cached prefix.

        Writes this block's K/V at its positions (a scratch area until the block is final: the
        commit pass, run on the finished block, leaves the clean K/V there). Logits only for
        `rows` of the block when given (the positions the decoder will look at).
        """
        t = ids.shape[0]
        if self.use_program and ids_host is not None and self.timers is None:
            out = self.program(cache, t).run(ids_host, start, info)
            return (out if rows is None else out[rows]) if logits else None
        positions = torch.arange(start, start + t, device=self.device)
        self._begin(info, t)
        x = self._layers(self.embed(ids), positions, cache=cache, start=start, mask=None)
        out = None
        if logits:
            out = self._head(x if rows is None else x[rows])
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
        self._begin(info, n)
        x = self._layers(self.embed(ids), positions, cache=None, start=0, mask=mask)
        out = self._head(x[rows])
        self.experts.end_forward()
        return out
