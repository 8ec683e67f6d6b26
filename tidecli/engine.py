"""Puts the pieces together: checkpoint → dense weights + expert runtime + model + tokenizer.

Commands build one `Engine` and ask it for generations; the engine never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tidecli.decode.diffusion import BlockDiffusionDecoder, DecodeSettings
from tidecli.errors import TideError
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.llada2 import LLaDA2Model
from tidecli.model.loader import dense_bytes, load_dense
from tidecli.model.resolve import resolve_model
from tidecli.model.tokenizer import ChatTokenizer

# progress(stage, done_bytes, total_bytes)
LoadProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    policy: str = "resident"
    block_length: int = 32
    kernel: str = "auto"  # expert kernel on the device: auto | grouped_mm | loop
    vram_gib: float | None = None  # total device budget; None → every expert fits (resident)
    experts_per_layer: int | None = None  # force a uniform B
    experts_per_layer_map: dict[int, int] | None = None  # per-layer B_ℓ (from the planner)
    tau: int | None = None
    stall_refresh: bool = False
    warm_start: bool = True
    skip_last_step: bool = True
    cpu_threads: int = 0  # 0 → torch's default
    cpu_mode: str = "intra"
    cpu_dtype: str = "auto"
    context_tokens: int = 4096  # KV cache reserved in the budget
    calibration: str | None = None  # routing trace for the static policy
    # static/tide misses: stream (the GPU places or reads missed experts from pinned RAM inside
    # the step; no host round trip; exact) | split (CPU and GPU scratch slots by measured cost)
    # | cpu | gpu (scratch slots; exact) | auto: stream on CUDA when possible, else split
    misses: str = "auto"
    graphs: bool = True  # CUDA: replay steps as captured graphs (off: the same program, eager)
    # host RAM for the expert store (experts kept in RAM + staging ring); None → what is
    # available: every expert when they fit, else the rest stay on disk (with a notice)
    ram_gib: float | None = None
    ram_experts_map: dict[int, int] | None = None  # experts per layer kept in RAM (a plan's)
    staging_experts: int | None = None  # ring buffers for experts read from disk (None → 16)
    # tide without --tau or budgets follows the planner: with this hardware profile (a reference
    # name or a file; None → this machine's saved one, measured once when missing; on a CPU
    # device only when given) and this decoding threshold
    profile: str | None = None
    threshold: float = 0.95


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise TideError(f"unknown device {name!r}", "use auto, cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TideError("--device cuda asked for, but no CUDA GPU is visible",
                        "use --device cpu, or check the NVIDIA driver")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if name == "auto":
        # bf16 is what the checkpoints hold; CPUs without bf16 units run fp32 faster
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise TideError(f"unknown dtype {name!r}", "use auto, bf16 or fp32")
    return table[name]


class Engine:
    SCRATCH_SLOTS = 16  # GPU slots that misses computed on the GPU pass through
    def __init__(self, opts: EngineOptions, *, progress: LoadProgress | None = None,
                 quiet: bool = False, build_runtime: bool = True) -> None:
        self.opts = opts
        self.memory_plan = None
        self.plan = None  # the planner's plan the tide policy follows (planner/auto.py)
        self._planned: tuple[tuple, object] | None = None  # (option key, plan) of the last plan
        self.notices: list[str] = []  # one-line facts a command shows the user (never printed here)
        self.path: Path = resolve_model(opts.model, quiet=quiet)
        self.ckpt = Checkpoint.open(self.path)
        self.cfg = self.ckpt.config
        self.tokenizer = ChatTokenizer(self.path)
        self.device = pick_device(opts.device)
        self.dtype = pick_dtype(opts.dtype, self.device)
        if opts.block_length < 1:
            raise TideError(f"--block-length must be at least 1, got {opts.block_length}",
                            "use 32 (the trained block length)")
        if self.cfg.max_position_embeddings % opts.block_length:
            raise TideError(f"--block-length {opts.block_length} does not divide the model's "
                            f"{self.cfg.max_position_embeddings} positions",
                            "use 32 (the trained block length)")
        self._check_options()  # before any weight is read: a real model takes minutes to load
        total = dense_bytes(self.ckpt)
        done = 0

        def dense_tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("dense weights", done, total)

        # The embedding table stays on the host: a step reads 32 of its rows.
        self.weights = load_dense(self.ckpt, device=self.device, dtype=self.dtype,
                                  embed_device=torch.device("cpu"), progress=dense_tick)
        self._store = None  # the host expert store, kept across runtime changes
        # without a runtime (set_runtime builds one later) the model cannot run yet
        self.runtime = self._build_runtime(progress) if build_runtime else None
        self.model = LLaDA2Model(self.cfg, self.weights, self.runtime, device=self.device,
                                 dtype=self.dtype, block_length=opts.block_length)
        # On CUDA a step runs as a static program (CUDA graphs unless turned off); on the CPU
        # the eager path is as fast and simpler.
        self.model.use_program = self.device.type == "cuda"
        self.model.capture = opts.graphs

    def set_runtime(self, progress: LoadProgress | None = None, **changes) -> None:
        """Replace the expert runtime with one built from changed options (policy, budgets, τ…);
        the dense weights and the host store are kept. Used to compare policies in one process."""
        if self.runtime is not None:
            self.runtime.close()
        self.model.experts = self.runtime = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.opts = replace(self.opts, **changes)
        self.memory_plan = None
        self.runtime = self._build_runtime(progress)
        self.model.experts = self.runtime
        self.model.reset_programs()

    def _check_options(self) -> dict[int, int] | None:
        """Refuse a bad policy, thread count or budget; returns the per-layer expert budgets
        (None: no limit asked for)."""
        from tidecli.experts.policies import MISS_MODES, POLICIES

        o = self.opts
        if o.policy not in POLICIES:
            raise TideError(f"unknown policy {o.policy!r}", f"choose one of {', '.join(POLICIES)}")
        if o.misses not in MISS_MODES:
            raise TideError(f"unknown --misses {o.misses!r}", f"use {', '.join(MISS_MODES)}")
        if o.ram_gib is not None and not 0 < o.ram_gib < float("inf"):  # also refuses nan
            raise TideError(f"--ram must be positive, got {o.ram_gib:g}", "e.g. --ram 48")
        if o.cpu_threads < 0:
            raise TideError(f"--cpu-threads must not be negative, got {o.cpu_threads}",
                            "0 uses torch's default")
        self.plan = self._runtime_plan()
        return self._budgets()

    def _runtime_plan(self):
        """The planner's plan when tide follows it (planner/auto.py), else None."""
        from tidecli.planner.auto import follows_plan, runtime_plan

        o = self.opts
        if not follows_plan(o, cuda=self.device.type == "cuda"):
            return None
        key = (o.vram_gib, o.ram_gib, o.misses, o.block_length, o.context_tokens, o.profile,
               o.threshold)
        if self._planned is None or self._planned[0] != key:  # once per option set: the free
            self._planned = (key, runtime_plan(self))  # VRAM drops after loading
        return self._planned[1]

    def _build_runtime(self, progress: LoadProgress | None):
        o = self.opts
        budgets = self._check_options()
        if o.policy == "resident" and (budgets is None or
                                       min(budgets.values(), default=0) >= self.cfg.num_experts):
            return self._resident(progress)
        if budgets is None:  # an offload policy without a budget: the whole device's memory
            budgets = self._budgets(default_vram=True)
        return self._offload(budgets, progress)

    def _budgets(self, default_vram: bool = False) -> dict[int, int] | None:
        from tidecli.experts.budget import uniform_budget

        o, cfg = self.opts, self.cfg
        given = o.experts_per_layer_map
        if given is None and self.plan is not None:
            given = self.plan.experts_per_layer
        if given is not None:  # per-layer B_ℓ, as a plan gives them
            budgets = {int(k): int(v) for k, v in given.items()}
            if set(budgets) != set(cfg.moe_layers) or \
                    any(not 0 <= v <= cfg.num_experts for v in budgets.values()):
                raise TideError("the per-layer expert budgets do not fit this model (every MoE "
                                f"layer, each in 0..{cfg.num_experts})",
                                "make the plan with this model: tide plan --model ...")
            if o.policy == "lru" and min(budgets.values()) < 1:
                raise TideError("the lru policy needs at least one expert slot per layer",
                                "raise the budgets")
            if o.vram_gib is not None:
                plan = uniform_budget(cfg, o.vram_gib, context_tokens=o.context_tokens,
                                      block_length=o.block_length,
                                      dtype_bytes=self.dtype.itemsize)
                room = plan.budget - plan.dense - plan.kv_cache - plan.workspace
                need = sum(max(v, 1) for v in budgets.values()) * plan.expert_bytes
                if need > room:  # a pool holds at least one row, even for B = 0
                    raise TideError(f"the per-layer expert budgets need {need / 2**30:.2f} GiB; "
                                    f"--vram {o.vram_gib:g} GiB leaves {room / 2**30:.2f} GiB",
                                    "lower the budgets or raise --vram")
                self.memory_plan = plan
            return {layer: budgets[layer] for layer in cfg.moe_layers}
        b: int | None = None
        if o.experts_per_layer is not None:
            if not 0 <= o.experts_per_layer <= cfg.num_experts:
                raise TideError(f"--experts-per-layer must be in 0..{cfg.num_experts}, got "
                                f"{o.experts_per_layer}",
                                f"e.g. --experts-per-layer {cfg.num_experts // 2}")
            b = o.experts_per_layer
        vram = o.vram_gib
        if vram is None and default_vram and b is None:
            vram = self._device_free_gib()
        if vram is not None:
            plan = uniform_budget(cfg, vram, context_tokens=o.context_tokens,
                                  block_length=o.block_length, dtype_bytes=self.dtype.itemsize)
            self.memory_plan = plan
            if b is None:
                b = plan.experts_per_layer
                if self._uses_scratch():  # the scratch slots come out of the same budget
                    b = max(0, b - -(-self.SCRATCH_SLOTS // max(1, cfg.num_moe_layers)))
            elif b > plan.experts_per_layer:
                raise TideError(f"--experts-per-layer {b} does not fit --vram {vram:g} GiB "
                                f"(at most {plan.experts_per_layer})", "lower one of them")
        if b is None:
            return None
        if o.policy == "lru" and b < 1:
            raise TideError("the lru policy needs at least one expert slot per layer",
                            "raise --vram or --experts-per-layer")
        return {layer: b for layer in cfg.moe_layers}

    def _uses_scratch(self) -> bool:
        o = self.opts
        if self.device.type != "cuda" or o.policy not in ("static", "tide"):
            return False
        return o.misses in ("gpu", "split") or (o.misses == "auto" and not self._may_stream())

    def _may_stream(self) -> bool:
        """Will `--misses auto` stream (before the host store exists, from the same facts)?"""
        from tidecli.experts.gather import stream_available
        from tidecli.model.tensorio import torch_dtype

        if self._store is not None:
            return self.stream_blocker(self._store) is None
        if stream_available(self.device) or \
                torch_dtype(self.ckpt.expert_dtype()) != self.dtype:
            return False
        return self.ckpt.routed_expert_bytes() <= self._ram_budget()

    def _ram_budget(self) -> int:
        """Bytes of RAM for the expert store: --ram (checked against what is available), else
        what is available minus the margin."""
        from tidecli.experts.budget import GIB
        from tidecli.experts.store import RAM_MARGIN, available_ram

        o = self.opts
        have = available_ram() - RAM_MARGIN
        if o.ram_gib is None:
            return max(0, have)
        budget = int(o.ram_gib * GIB)
        if budget > have:
            raise TideError(f"--ram {o.ram_gib:g} GiB is more than the "
                            f"{max(0, have) / GIB:.1f} GiB of RAM available (keeping "
                            f"{RAM_MARGIN / GIB:.0f} GiB free)", "lower --ram")
        return budget

    def _device_free_gib(self) -> float:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return free / 2**30 * 0.9
        import psutil

        return psutil.virtual_memory().available / 2**30 / 2

    def _byte_ticker(self, progress: LoadProgress | None, stage: str) -> Callable[[int], None]:
        """tick(n) adds n bytes to `stage`'s progress out of every routed expert's bytes."""
        total = self.ckpt.routed_expert_bytes()
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(stage, done, total)
        return tick

    def _resident(self, progress: LoadProgress | None):
        from tidecli.experts.runtime import ResidentRuntime, load_expert_pools

        tick = self._byte_ticker(progress, "experts")
        host = getattr(self._store, "layers", None)
        if host is not None:  # already in host memory: copy from there
            pools = {layer: buf.to(self.device, self.dtype) for layer, buf in host.items()}
        else:
            pools = load_expert_pools(self.ckpt, device=self.device, dtype=self.dtype,
                                      progress=tick)
        return ResidentRuntime(self.cfg, pools, device=self.device, dtype=self.dtype,
                               kernel=self.opts.kernel)

    def _offload(self, budgets: dict[int, int], progress: LoadProgress | None):
        from tidecli.experts.offload import OffloadRuntime
        from tidecli.experts.policies import (
            LruPolicy,
            ResidentPolicy,
            StaticPolicy,
            TideOptions,
            TidePolicy,
        )

        o = self.opts
        if o.policy == "tide":
            tau = o.tau or (self.plan.tau if self.plan is not None else 4)
            policy = TidePolicy(TideOptions(tau=tau, stall_refresh=o.stall_refresh,
                                            warm_start=o.warm_start,
                                            skip_last_step=o.skip_last_step))
        elif o.policy == "lru":
            policy = LruPolicy()
        elif o.policy == "static":
            policy = StaticPolicy(self._calibration())
        else:
            policy = ResidentPolicy()
        store = self.host_store(progress)
        misses = o.misses
        if o.policy in ("static", "tide") and misses in ("auto", "stream"):
            why = self.stream_blocker(store)
            if misses == "stream" and why:
                raise TideError(f"--misses stream is not available: {why}",
                                "use --misses auto")
            if not why and (misses == "stream" or self.device.type == "cuda"):
                from tidecli.experts.stream import StreamRuntime

                return StreamRuntime(self.cfg, store, budgets, policy, device=self.device,
                                     dtype=self.dtype, kernel=o.kernel)
            misses = "split"
        cpu_dtype = None if o.cpu_dtype == "auto" else pick_dtype(o.cpu_dtype, self.device)
        threads = o.cpu_threads
        if not threads and self.plan is not None and self.plan.misses == "cpu":
            threads = self.plan.cpu_threads
        return OffloadRuntime(self.cfg, store, budgets, policy, device=self.device,
                              dtype=self.dtype, cpu_threads=threads, cpu_mode=o.cpu_mode,
                              cpu_dtype=cpu_dtype, kernel=o.kernel, misses=misses,
                              scratch_slots=self.SCRATCH_SLOTS)

    def stream_blocker(self, store) -> str | None:
        """Why misses cannot be streamed from host memory here (None: they can)."""
        from tidecli.experts.gather import stream_available
        from tidecli.experts.store import HostExpertStore

        if not isinstance(store, HostExpertStore):
            return "some experts live on disk (the tiered store)"
        if self.device.type == "cuda" and store.dtype != self.dtype:  # raw rows are read
            return (f"the experts are stored as {store.dtype} but the model runs in "
                    f"{self.dtype}")
        if self.device.type == "cuda" and not store.pinned:
            return "the host experts are not in pinned memory"
        return stream_available(self.device)

    def host_store(self, progress: LoadProgress | None = None):
        """The routed experts on the host, loaded once and kept: all in (pinned) RAM when they
        fit the RAM budget, else tiered (experts/tiered.py)."""
        if self._store is None:
            from tidecli.experts.store import HostExpertStore

            tick = self._byte_ticker(progress, "host experts")
            self._store = self._tiered_store(tick)
            if self._store is None:
                self._store = HostExpertStore(self.ckpt, pin=self.device.type == "cuda",
                                              progress=tick)
        return self._store

    def _tiered_store(self, tick):
        """The tiered store when the experts do not fit the RAM budget (--ram, else what is
        available): as many per layer in RAM as it holds (a plan's counts, else uniform), the
        rest read from the checkpoint's files on demand. None when everything fits."""
        from tidecli.experts.budget import GIB, host_tiers
        from tidecli.experts.tiered import TieredExpertStore
        from tidecli.model.tensorio import torch_dtype

        o = self.opts
        need = self.ckpt.routed_expert_bytes()
        budget = self._ram_budget()
        if need <= budget:
            return None
        itemsize = torch_dtype(self.ckpt.expert_dtype()).itemsize
        ram_map, staging = o.ram_experts_map, o.staging_experts
        if ram_map is None and self.plan is not None and self.plan.tiered:
            ram_map, staging = dict(self.plan.experts_in_ram), self.plan.staging_experts
        host = host_tiers(self.cfg, budget, dtype_bytes=itemsize, staging_experts=staging,
                          ram_per_layer=ram_map)
        popularity = self._popularity()
        skip = None  # static + calibration: its GPU placement is fixed, keep the next ones
        if o.policy == "static" and popularity is not None:
            skip = self._budgets(default_vram=True)
        store = TieredExpertStore(self.ckpt, host, pin=self.device.type == "cuda",
                                  popularity=popularity, skip=skip, progress=tick)
        self.notices.append(
            f"the routed experts need {need / GIB:.1f} GiB and {budget / GIB:.1f} GiB of RAM is "
            f"{'given' if o.ram_gib is not None else 'available'}: {host.ram_experts} of "
            f"{host.ram_experts + host.disk_experts} stay in RAM, the other "
            f"{host.disk_experts} are read from disk when used (slower, same tokens)")
        return store

    def _trace_counts(self):
        """The calibration trace's counts [F, L, E] and its layers, or None without one."""
        if not self.opts.calibration:
            return None
        from tidecli.experts.trace import RoutingTrace

        tr = RoutingTrace.load(self.opts.calibration)
        if tr.num_experts != self.cfg.num_experts or tr.moe_layers != self.cfg.moe_layers:
            raise TideError("the calibration trace was recorded with another model",
                            "record one with this model: tide generate --trace FILE")
        return tr.array().astype("int64"), tr.moe_layers

    def _popularity(self):
        """Per MoE layer, in how many forward passes each expert was used (calibration trace)."""
        got = self._trace_counts()
        if got is None:
            return None
        used = (got[0] > 0).sum(axis=0)
        return {layer: used[j] for j, layer in enumerate(got[1])}

    def _calibration(self):
        """Per MoE layer, how many tokens each expert received (calibration trace)."""
        got = self._trace_counts()
        if got is None:
            return None
        totals = got[0].sum(axis=0)
        return {layer: totals[j] for j, layer in enumerate(got[1])}

    # ---- prompts and generations ----------------------------------------------------------------

    def prompt_ids(self, prompt: str, *, system: str | None = None, raw: bool = False,
                   history: list[dict[str, str]] | None = None) -> list[int]:
        if not prompt.strip():
            raise TideError("the prompt is empty", "give some text to start from")
        if raw:
            ids = self.tokenizer.encode(prompt)
        else:
            messages = []
            if system:
                messages.append({"role": "system", "content": system})
            messages.extend(history or [])
            messages.append({"role": "user", "content": prompt})
            ids = self.tokenizer.encode_chat(messages)
        if not ids:
            raise TideError("the prompt encodes to no tokens", "give some text to start from")
        return ids

    def check_length(self, n_prompt: int, settings: DecodeSettings) -> None:
        limit = self.cfg.max_position_embeddings
        if n_prompt >= limit:
            raise TideError(f"the prompt is {n_prompt} tokens; the model holds {limit} positions",
                            "shorten the prompt (with room left for the reply); in chat, /reset")
        if n_prompt + settings.gen_length > limit:
            raise TideError(
                f"prompt ({n_prompt} tokens) + --gen-length {settings.gen_length} exceeds the "
                f"model's {limit} positions",
                f"shorten the prompt or use --gen-length {limit - n_prompt} or less")

    def decoder(self, ids: list[int], settings: DecodeSettings) -> BlockDiffusionDecoder:
        settings = replace(settings, block_length=self.opts.block_length) \
            if settings.block_length != self.opts.block_length else settings
        settings.validate(self.cfg.max_position_embeddings)
        self.check_length(len(ids), settings)
        t = self.tokenizer.ids
        return BlockDiffusionDecoder(self.model, ids, settings, mask_id=t.mask,
                                     eos_ids={t.eos}, device=self.device)

    def describe(self) -> dict:
        out = {
            "model": str(self.path),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            **self.runtime.describe(),
        }
        if self.memory_plan is not None:
            out["memory_plan"] = self.memory_plan.to_dict()
        if self.plan is not None:
            out["plan"] = self.plan.summary()
        if self.device.type == "cuda":
            out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
