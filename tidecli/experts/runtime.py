"""The expert-runtime seam and the all-resident runtime.

The MoE layer calls `run(layer, hidden [T, H], ids [T, k], weights [T, k])` and gets the routed
experts' weighted sum [T, H] back. A runtime decides where each expert runs; it never changes
which experts a token uses or their weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tidecli.experts.compute import (
    combine,
    grouped_mm_available,
    pool_views,
    run_grouped_loop,
    run_grouped_mm,
)
from tidecli.experts.stats import ExpertStats
from tidecli.experts.trace import RoutingTrace
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.config import ModelConfig
from tidecli.model.llada2 import ForwardInfo
from tidecli.model.tensorio import ShardReader, check_finite, torch_dtype


class ExpertRuntime:
    """Base: forward bookkeeping, counters and the optional routing trace."""

    name = "base"

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.k = cfg.num_experts_per_tok
        self.layer_index = {layer: j for j, layer in enumerate(cfg.moe_layers)}
        self.info = ForwardInfo("step")
        self.forward_stats = ExpertStats()  # the forward pass in progress
        self.run_stats = ExpertStats()  # every forward pass since the last reset
        self.trace: RoutingTrace | None = None
        self._trace_counts: list[torch.Tensor | np.ndarray | None] = []
        self._tokens = 0

    def enable_trace(self) -> RoutingTrace:
        cfg = self.cfg
        self.trace = RoutingTrace(cfg.num_moe_layers, cfg.num_experts, list(cfg.moe_layers))
        return self.trace

    def begin_forward(self, info: ForwardInfo) -> None:
        self.info = info
        self.forward_stats = ExpertStats(forwards=1)
        self._trace_counts = [None] * self.cfg.num_moe_layers
        self._tokens = 0

    def reset_stats(self) -> None:
        self.run_stats = ExpertStats()

    def end_forward(self) -> ExpertStats:
        self.run_stats.add(self.forward_stats)
        if self.trace is not None:
            e = self.cfg.num_experts
            rows = []
            for c in self._trace_counts:
                if c is None:
                    rows.append(np.zeros(e, dtype=np.int64))
                elif isinstance(c, torch.Tensor):
                    rows.append(c.cpu().numpy())
                else:
                    rows.append(c)
            self.trace.append(np.stack(rows), kind=self.info.kind, block=self.info.block,
                              step=self.info.step, tokens=self._tokens)
        return self.forward_stats

    def _record_routing(self, layer: int, ids: torch.Tensor | np.ndarray) -> None:
        if self.trace is None:
            return
        j = self.layer_index[layer]
        self._tokens = int(ids.shape[0])
        if isinstance(ids, np.ndarray):
            self._trace_counts[j] = np.bincount(ids.reshape(-1), minlength=self.cfg.num_experts)
        else:  # stays on the device until the forward ends: no sync per layer
            self._trace_counts[j] = torch.bincount(ids.reshape(-1), minlength=self.cfg.num_experts)

    def run(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"policy": self.name}

    def close(self) -> None:
        """Release pinned memory, streams and threads."""


ProgressFn = Callable[[int], None]


def read_expert_packed(reader: ShardReader, ckpt: Checkpoint, layer: int, expert: int,
                       out: torch.Tensor, *, check: bool = True) -> None:
    """Fill one packed expert row `out` [3·I·H] (CPU, in the stored dtype) from the shards."""
    offset = 0
    for info in ckpt.expert_infos(layer, expert):
        n = info.nbytes // out.element_size()
        part = out[offset: offset + n]
        reader.read_into(info, part)
        if check:
            check_finite(info.name, part)
        offset += n


def load_expert_pools(ckpt: Checkpoint, *, device: torch.device, dtype: torch.dtype,
                      progress: ProgressFn | None = None) -> dict[int, torch.Tensor]:
    """Every routed expert on `device`, one packed buffer [E, 3·I·H] per MoE layer."""
    cfg = ckpt.config
    stored = torch_dtype(ckpt.expert_dtype())
    row = cfg.expert_params
    pools: dict[int, torch.Tensor] = {}
    pin = device.type == "cuda"
    staging = torch.empty((cfg.num_experts, row), dtype=stored, pin_memory=pin)
    with ShardReader() as reader:
        for layer in cfg.moe_layers:
            for e in range(cfg.num_experts):
                read_expert_packed(reader, ckpt, layer, e, staging[e])
                if progress:
                    progress(cfg.expert_bytes(staging.element_size()))
            pool = torch.empty((cfg.num_experts, row), dtype=dtype, device=device)
            pool.copy_(staging, non_blocking=pin)
            if pin:  # the staging buffer is reused for the next layer
                torch.cuda.current_stream(device).synchronize()
            pools[layer] = pool
    return pools


class ResidentRuntime(ExpertRuntime):
    """Every expert on the compute device: the upper bound when the model fits."""

    name = "resident"

    def __init__(self, cfg: ModelConfig, pools: dict[int, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype, kernel: str = "auto") -> None:
        super().__init__(cfg, device, dtype)
        self.views = {layer: pool_views(buf, cfg.hidden_size, cfg.moe_intermediate_size)
                      for layer, buf in pools.items()}
        self.pools = pools
        if kernel == "auto":
            kernel = "grouped_mm" if grouped_mm_available(device, dtype) else "loop"
        self.kernel = kernel

    def run(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.views[layer]
        pair_slot = ids.reshape(-1)  # every expert is resident: slot = expert id
        self._record_routing(layer, ids)
        c = self.forward_stats.layer(layer)
        c.gpu_hits += pair_slot.numel()
        if self.kernel == "grouped_mm":
            pair_out = run_grouped_mm(hidden, pair_slot, gate_up, down, self.k)
        else:
            pair_out = torch.empty((pair_slot.numel(), hidden.shape[1]), dtype=hidden.dtype,
                                   device=hidden.device)
            run_grouped_loop(hidden, pair_slot, gate_up, down, self.k, pair_out)
        return combine(pair_out, weights, hidden.dtype)

    def describe(self) -> dict:
        return {"policy": self.name, "kernel": self.kernel}
