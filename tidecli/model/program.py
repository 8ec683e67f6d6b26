"""One denoising step as a fixed program of device segments, captured as CUDA graphs.

A step runs the block's T positions through every layer against a KV cache of fixed capacity
(keys past the block are masked), so every shape is static and the device work between host
points can be captured once and replayed: launching ~80 small kernels per layer from Python
costs far more than running them. Host points sit after each MoE layer's router, where the
expert runtime may read the routing, promote experts and compute misses on the CPU:

    chunk 0:   input → dense layers → attention + router of MoE layer 0 (+ routing to host)
    gpu j:     resident experts of MoE layer j + its shared expert
    chunk j+1: combine layer j (override rows from the host) → ... router of MoE layer j+1
    chunk M:   combine the last MoE layer → final norm → lm_head

A runtime that needs no host phases (all experts resident) gets the whole step as one graph.
On a CPU device, or with capture off, the same segments run eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from tidecli.errors import TideError
from tidecli.model.llada2 import KVCache, LLaDA2Model
from tidecli.model.moe import ForwardInfo, LayerIO
from tidecli.model.parts import EAGER, LayerFns

_SIDE_STREAMS: dict[tuple[torch.device, str], torch.cuda.Stream] = {}


def side_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """The one side stream per device and role ("warmup": every capture warms up on it;
    "prefetch": the read-ahead of the next MoE layer's experts; "gather": the rows of the experts
    a streamed-miss layer places, while its other experts compute). cuBLAS keeps a workspace for
    each stream it has run on (tens of MiB on recent GPUs) until the process ends, so a new
    stream per capture grew the allocation by one workspace every time programs were captured
    again (a new runtime, a new block shape, every `tide bench` run)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _SIDE_STREAMS.get((device, role))
    if stream is None:
        stream = _SIDE_STREAMS[(device, role)] = torch.cuda.Stream(device)
    return stream


class StepProgram:
    def __init__(self, model: LLaDA2Model, cache: KVCache, block: int, *, capture: bool,
                 fns: LayerFns = EAGER) -> None:
        cfg = model.cfg
        self.model = model
        self.fns = fns  # eager, or compiled (model/parts.py)
        self.rt = model.experts
        self.cache = cache
        self.T = block
        dev, dt = model.device, model.dtype
        self.device = dev
        self.cuda = dev.type == "cuda"
        k, h = cfg.num_experts_per_tok, cfg.hidden_size
        self.moe = list(cfg.moe_layers)
        m = len(self.moe)
        self.x0 = torch.zeros(block, h, dtype=dt, device=dev)
        self.start = torch.zeros(1, dtype=torch.long, device=dev)
        self._offsets = torch.arange(block, device=dev)
        self._key_pos = torch.arange(cache.capacity, device=dev)
        self.over = torch.zeros(block * k, h, dtype=dt, device=dev)
        self.over_mask = torch.zeros(block * k, dtype=torch.bool, device=dev)
        self.to_host = self.cuda and self.rt.needs_host
        pin = self.cuda
        self.host_ids = [torch.empty((block, k), dtype=torch.long, pin_memory=pin)
                         for _ in range(m)]
        self.host_x = [torch.empty((block, h), dtype=dt, pin_memory=pin) for _ in range(m)]
        self._x_stage = torch.empty((block, h), dtype=dt, pin_memory=pin)
        self._start_stage = torch.zeros(1, dtype=torch.long, pin_memory=pin)
        self._table_np: tuple[torch.Tensor, np.ndarray] | None = None  # the host embedding
        # table, and numpy's view of it
        self._stage_np: np.ndarray | None = None
        self.h: list = [None] * m
        self.n: list = [None] * m
        self.ids: list = [None] * m
        self.w: list = [None] * m
        self.pair: list = [None] * m
        self.shared: list = [None] * m
        self.logits: torch.Tensor | None = None
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.single = not self.rt.needs_host
        # read-ahead of the next MoE layer's experts (a runtime that takes guesses)
        self.prefetch = self.rt.prefetches
        # per MoE layer: the end of its read-ahead on the side stream (its layer joins that),
        # one event each made once (an eager step records them again every step)
        self._ahead_done = [torch.cuda.Event() for _ in range(m)] \
            if self.prefetch and self.cuda else []
        self._ahead: list[torch.cuda.Event | None] = [None] * m
        if capture and self.cuda:
            self._capture()

    # ---- device segments ------------------------------------------------------------------------

    def _where(self) -> None:
        """The step's positions, key mask and RoPE tables, once for every layer (positions
        live on the device: static shapes)."""
        self.positions = self.start + self._offsets
        self.mask = (self._key_pos < self.start + self.T)[None, :]
        self.rope = self.model.rope(self.positions)

    def _attn(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's attention part over the whole fixed-size cache, keys past the block
        masked."""
        return self.model.attention_part(i, x, self.positions, kv=self.cache.layer(i),
                                         kv_start=None, mask=self.mask, rope=self.rope,
                                         fns=self.fns)

    def _chunk(self, j: int) -> None:
        """From the end of MoE layer j-1 (or the input) to the router of MoE layer j (or the
        logits when j is past the last MoE layer)."""
        model = self.model
        if j == 0:
            self._where()
            x, first = self.x0, 0
        else:
            prev = self.moe[j - 1]
            rows = self.rt.device_end(prev, self.pair[j - 1], self.over, self.over_mask)
            x = self.fns.moe_out(self.h[j - 1], rows, self.w[j - 1], self.shared[j - 1])
            first = prev + 1
        stop = self.moe[j] if j < len(self.moe) else model.cfg.num_hidden_layers
        for i in range(first, stop):  # dense layers in between
            x = model.dense_part(i, *self._attn(i, x), fns=self.fns)
        if j == len(self.moe):
            self.logits = model.head(x)
            return
        layer = self.moe[j]
        h, n = self._attn(layer, x)
        ids, w = model.route(layer, n, static=True, fns=self.fns)
        self.h[j], self.n[j], self.ids[j], self.w[j] = h, n, ids, w
        if self.prefetch and j + 1 < len(self.moe):
            self._read_ahead(j + 1, n)
        if self.to_host:  # the routing goes to the host as soon as it exists
            self.host_ids[j].copy_(ids, non_blocking=True)
            self.host_x[j].copy_(n, non_blocking=True)

    def _read_ahead(self, j: int, n: torch.Tensor) -> None:
        """Guess MoE layer j's experts from the layer before's input and let the runtime read
        them, on a side stream: it overlaps that layer's experts and layer j's attention, and
        joins before layer j's experts run (`_gpu`). The join waits for an event recorded after
        this read-ahead alone: waiting for the side stream itself would also wait for the next
        layer's read-ahead, queued there later, and hold every layer's experts until the next
        layer's experts had crossed PCIe."""
        nxt = self.moe[j]
        if not self.cuda:
            self.rt.prefetch(nxt, self.model.predict(nxt, n, static=True))
            return
        side = side_stream(self.device, "prefetch")
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.rt.prefetch(nxt, self.model.predict(nxt, n, static=True))
            done = self._ahead_done[j]
            done.record(side)
        self._ahead[j] = done

    def _gpu(self, j: int) -> None:
        layer = self.moe[j]
        done = self._ahead[j]
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            self._ahead[j] = None
        self.pair[j] = self.rt.device_begin(layer, self.n[j], self.ids[j])
        self.shared[j] = self.model.shared_part(layer, self.n[j], fns=self.fns)

    def _segments(self) -> list:
        segs = []
        for j in range(len(self.moe)):
            segs.append(lambda j=j: self._chunk(j))
            segs.append(lambda j=j: self._gpu(j))
        segs.append(lambda: self._chunk(len(self.moe)))
        return segs

    def _capture(self) -> None:
        segs = self._segments()
        # The warm-up runs write K/V at positions start..start+T: point them at the cache's last
        # block, which holds nothing yet when the first step of a generation captures (the
        # prompt's K/V at the front must survive), and which a step rewrites before reading.
        self.start.fill_(self.cache.capacity - self.T)
        side = side_stream(self.device, "warmup")
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: kernels chosen, workspaces allocated
            for _ in range(2):
                for seg in segs:
                    seg()
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        groups = [segs] if self.single else [[s] for s in segs]
        self.graphs = []
        for group in groups:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                for seg in group:
                    seg()
            self.graphs.append(g)

    # ---- one step -------------------------------------------------------------------------------

    def _host_rows(self, table: torch.Tensor, ids: list[int]) -> None:
        """The block's embedding rows from the host table into the pinned stage. A gather of a
        few rows in numpy runs on this thread alone: torch's CPU index wakes an OpenMP team
        first, and one worker slow to wake stalled a step's start by 3-6 ms on a busy host
        (profiler trace of host-driven misses on an H200 host). Same bytes either way."""
        ints = {2: torch.int16, 4: torch.int32}.get(table.element_size())
        if ints is None or table.dtype != self._x_stage.dtype or not table.is_contiguous():
            self._x_stage.copy_(table[torch.tensor(ids)])
            return
        if self._table_np is None or self._table_np[0] is not table:
            self._table_np = (table, table.view(ints).numpy())
            self._stage_np = self._x_stage.view(ints).numpy()
        np.take(self._table_np[1], np.asarray(ids, dtype=np.int64), axis=0, out=self._stage_np)

    def _load_inputs(self, ids: list[int], start: int) -> None:
        table = self.model.w.embed
        if self.cuda and table.device.type == "cpu":
            self._host_rows(table, ids)
            self.x0.copy_(self._x_stage, non_blocking=True)
            self._start_stage[0] = start
            self.start.copy_(self._start_stage, non_blocking=True)
        else:
            self.x0.copy_(table[torch.tensor(ids, device=table.device)])
            self.start.fill_(start)

    def run(self, ids: list[int], start: int, info: ForwardInfo) -> torch.Tensor:
        """ids: the block's tokens (host list); returns logits [T, V] (a static buffer)."""
        if self.cuda:
            # the host stages below are reused: the previous step must have consumed them
            torch.cuda.current_stream(self.device).synchronize()
        self._load_inputs(ids, start)
        rt = self.rt
        self.model.begin_forward(info, self.T)
        segs = self.graphs if self.graphs is not None else self._segments()
        replay = (lambda g: g.replay()) if self.graphs is not None else (lambda f: f())
        if self.single:
            for g in (segs if self.graphs is None else self.graphs):
                replay(g)
            for j, layer in enumerate(self.moe):
                rt.host_after(layer, LayerIO(ids=self.ids[j], hidden=self.n[j]), self.pair[j],
                              None, None)
        else:
            for j, layer in enumerate(self.moe):
                replay(segs[2 * j])
                io = LayerIO(ids=self.ids[j], hidden=self.n[j])
                if self.to_host:
                    io.host_ids, io.host_x = self.host_ids[j], self.host_x[j]
                    io.ready = torch.cuda.Event()
                    io.ready.record()
                self.over_mask.zero_()
                rt.host_before(layer, io)
                replay(segs[2 * j + 1])
                rt.host_after(layer, io, self.pair[j], self.over, self.over_mask)
            replay(segs[-1])
        rt.end_forward()
        return self.logits


class StepPrograms:
    """The model as the decoder sees it on a GPU: denoising steps and commit passes run as step
    programs (captured as CUDA graphs when `capture`), one per (cache, block length); prefill
    and the reference path run eagerly. `reset` forgets the programs (after the expert runtime
    or the routing changed). With a `fallback`, a compile that fails switches the programs to
    those functions (a line in `notices` says why) instead of stopping the run."""

    def __init__(self, model: LLaDA2Model, *, capture: bool = True,
                 fns: LayerFns = EAGER, fallback: LayerFns | None = None,
                 notices: list[str] | None = None) -> None:
        self.model = model
        self.capture = capture
        self.fns = fns
        self.fallback = fallback
        self.notices = notices if notices is not None else []
        self._programs: dict[int, StepProgram] = {}

    def __getattr__(self, name: str):  # cfg, dtype, device, experts, prefill, reference_logits…
        return getattr(self.model, name)

    def reset(self) -> None:
        self._programs.clear()

    def program(self, cache: KVCache, block: int) -> StepProgram:
        prog = self._programs.get(block)
        if prog is None or prog.cache is not cache or prog.rt is not self.model.experts:
            prog = StepProgram(self.model, cache, block, capture=self.capture, fns=self.fns)
            self._programs[block] = prog
        return prog

    @torch.inference_mode()
    def block_forward(self, ids: torch.Tensor, start: int, cache: KVCache, info: ForwardInfo,
                      *, rows: torch.Tensor | None = None, logits: bool = True,
                      ids_host: list[int] | None = None) -> torch.Tensor | None:
        if ids_host is None:
            return self.model.block_forward(ids, start, cache, info, rows=rows, logits=logits)
        try:  # a program compiles (--compile on) when it is captured or first run
            out = self.program(cache, ids.shape[0]).run(ids_host, start, info)
        except Exception as exc:
            from torch._dynamo.exc import TorchDynamoException

            if self.fns.name != "compiled" or not isinstance(exc, TorchDynamoException):
                raise
            self.reset()
            cause = getattr(exc, "inner_exception", None) or exc  # the backend's own error
            first = (str(cause).strip().splitlines() or [""])[0][:160]
            what = f"compiling the step failed ({type(cause).__name__}: {first})"
            if self.fallback is None:
                raise TideError(what, "run with --compile off; TIDE_DEBUG=1 shows the "
                                "traceback") from exc
            self.fns, self.fallback = self.fallback, None  # the step's inputs are unchanged
            self.notices.append(f"--compile auto: {what}; the steps run uncompiled")
            out = self.program(cache, ids.shape[0]).run(ids_host, start, info)
        return (out if rows is None else out[rows]) if logits else None
