"""The base of every expert runtime (model/moe.py's seam) and the all-resident runtime.

`BaseRuntime` keeps the forward bookkeeping every runtime shares: counters per forward pass and
run, the optional routing trace, and `run` as the phases in order (`host_before` →
`device_begin` → `host_after` → `device_end`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from tidecli.experts.compute import pick_kernel, pool_views, run_pairs
from tidecli.experts.formats import ExpertFormat, compressed_name
from tidecli.experts.info import RuntimeInfo
from tidecli.experts.trace import RoutingTrace
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.config import ModelConfig
from tidecli.model.counters import ExpertStats
from tidecli.model.moe import ForwardInfo, LayerIO
from tidecli.model.parts import combine
from tidecli.model.tensorio import ShardReader, check_finite, torch_dtype


class BaseRuntime(ABC):
    """Forward bookkeeping, counters and the optional routing trace. A runtime implements
    `device_begin`; the host hooks and `prefetch` do nothing unless a runtime needs them."""

    name = "base"
    needs_host = False  # True: host phases between the device phases (no single-graph step)
    prefetches = False  # True: `prefetch` reads guessed experts ahead of their layer
    prefetches_steps = False  # True: `prefetch_step` reads a step's guessed experts before it

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

    def reset_stats(self) -> None:
        self.run_stats = ExpertStats()

    def begin_forward(self, info: ForwardInfo) -> None:
        self.info = info
        self.forward_stats = ExpertStats(forwards=1)
        self._trace_counts = [None] * self.cfg.num_moe_layers
        self._tokens = 0

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
            flat = ids.reshape(-1)
            self._trace_counts[j] = torch.zeros(self.cfg.num_experts, dtype=torch.long,
                                                device=flat.device).scatter_add_(
                0, flat, torch.ones_like(flat))

    # ---- phases ---------------------------------------------------------------------------------

    @abstractmethod
    def device_begin(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Device only: per-pair output rows [T·k, H] of the resident experts, zero elsewhere."""

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """Device only: ids [T, k] guess `layer`'s experts (only when `prefetches`)."""
        return None

    def prefetch_step(self, guess) -> None:
        """Host: `guess()` [M, T, n] (numpy, or None) the experts of the step about to run
        (only when `prefetches_steps`)."""
        return None

    def host_before(self, layer: int, io: LayerIO) -> None:
        """Host work that must precede device_begin (activations, promotions before compute)."""
        return None

    def host_after(self, layer: int, io: LayerIO, pair_out: torch.Tensor,
                   over: torch.Tensor | None, over_mask: torch.Tensor | None) -> None:
        """Host work after device_begin was queued, every forward pass (also when the device
        phases replay from a captured graph): counters, the trace, and — for runtimes that
        need the host — rows computed elsewhere, written to `over` with `over_mask` set."""
        return None

    def device_end(self, layer: int, pair_out: torch.Tensor, over: torch.Tensor | None,
                   over_mask: torch.Tensor | None) -> torch.Tensor:
        """Device only: the per-pair rows with the overridden ones replaced (the model weights
        and sums them: `model.parts.combine`)."""
        if over is not None:
            pair_out = torch.where(over_mask[:, None], over, pair_out)
        return pair_out

    def run(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
        io = self.make_io(ids, hidden)
        self.host_before(layer, io)
        pair_out = self.device_begin(layer, hidden, ids)
        over = over_mask = None
        if self.needs_host:
            over = torch.empty_like(pair_out)
            over_mask = torch.zeros(pair_out.shape[0], dtype=torch.bool, device=pair_out.device)
        self.host_after(layer, io, pair_out, over, over_mask)
        rows = self.device_end(layer, pair_out, over, over_mask)
        return combine(rows, weights, rows.dtype)

    def make_io(self, ids: torch.Tensor, hidden: torch.Tensor) -> LayerIO:
        return LayerIO(ids=ids, hidden=hidden)

    def describe(self) -> RuntimeInfo:
        return RuntimeInfo(policy=self.name)

    def close(self) -> None:
        """Release pinned memory, streams and threads."""
        return None


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
            check_finite(info.name, part, shard=info.file.name)
        offset += n


def load_expert_pools(ckpt: Checkpoint, *, device: torch.device, dtype: torch.dtype,
                      progress: ProgressFn | None = None,
                      chunk: int = 32) -> dict[int, torch.Tensor]:
    """Every routed expert on `device`, one packed buffer [E, 3·I·H] per MoE layer."""
    cfg = ckpt.config
    stored = torch_dtype(ckpt.expert_dtype())
    row = cfg.expert_params
    pools: dict[int, torch.Tensor] = {}
    cuda = device.type == "cuda"
    chunk = min(chunk, cfg.num_experts)
    # two pinned staging buffers: one fills from disk while the other copies to the GPU
    staging = [torch.empty((chunk, row), dtype=stored, pin_memory=cuda) for _ in range(2)]
    done_ev: list[torch.cuda.Event | None] = [None, None]
    with ShardReader() as reader:
        for layer in cfg.moe_layers:
            pool = torch.empty((cfg.num_experts, row), dtype=dtype, device=device)
            for n, first in enumerate(range(0, cfg.num_experts, chunk)):
                buf, slot = staging[n % 2], n % 2
                if done_ev[slot] is not None:
                    done_ev[slot].synchronize()
                count = min(chunk, cfg.num_experts - first)
                for i in range(count):
                    read_expert_packed(reader, ckpt, layer, first + i, buf[i])
                    if progress:
                        progress(row * buf.element_size())
                pool[first: first + count].copy_(buf[:count], non_blocking=cuda)
                if cuda:
                    done_ev[slot] = torch.cuda.Event()
                    done_ev[slot].record()
            pools[layer] = pool
    if cuda:
        torch.cuda.synchronize(device)
    return pools


class ResidentRuntime(BaseRuntime):
    """Every expert on the compute device: the upper bound when the model fits."""

    name = "resident"

    def __init__(self, cfg: ModelConfig, pools: dict[int, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype, kernel: str = "auto",
                 fmt: ExpertFormat | None = None) -> None:
        super().__init__(cfg, device, dtype)
        self.views = {layer: pool_views(buf, cfg.hidden_size, cfg.moe_intermediate_size, fmt)
                      for layer, buf in pools.items()}
        self.pools = pools
        self.format = fmt
        self.kernel = pick_kernel(kernel, device, dtype, fmt)
        self._dev_counts: dict[int, torch.Tensor] = {}

    def host_after(self, layer, io, pair_out, over, over_mask):
        self.forward_stats.layer(layer).gpu_hits += io.ids.numel()
        if self.trace is not None:
            self._trace_counts[self.layer_index[layer]] = self._dev_counts[layer]
            self._tokens = int(io.ids.shape[0])

    def device_begin(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.views[layer]
        pair_slot = ids.reshape(-1)  # every expert is resident: slot = expert id
        if self.trace is not None:  # counted on the device, read once the forward ends
            self._dev_counts[layer] = torch.zeros(
                self.cfg.num_experts, dtype=torch.long, device=ids.device).scatter_add_(
                0, pair_slot, torch.ones_like(pair_slot))
        return run_pairs(self.kernel, hidden, pair_slot, gate_up, down, self.k)

    def describe(self) -> RuntimeInfo:
        return RuntimeInfo(policy=self.name, kernel=self.kernel,
                           experts_format=compressed_name(self.format))
