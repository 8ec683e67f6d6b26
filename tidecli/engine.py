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
    graphs: bool = True  # CUDA: replay steps as captured graphs (off: the same program, eager)


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
    def __init__(self, opts: EngineOptions, *, progress: LoadProgress | None = None,
                 quiet: bool = False) -> None:
        self.opts = opts
        self.memory_plan = None
        self.path: Path = resolve_model(opts.model, quiet=quiet)
        self.ckpt = Checkpoint.open(self.path)
        self.cfg = self.ckpt.config
        self.tokenizer = ChatTokenizer(self.path)
        self.device = pick_device(opts.device)
        self.dtype = pick_dtype(opts.dtype, self.device)
        if self.cfg.max_position_embeddings % opts.block_length:
            raise TideError(f"--block-length {opts.block_length} does not divide the model's "
                            f"{self.cfg.max_position_embeddings} positions",
                            "use 32 (the trained block length)")
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
        self.runtime = self._build_runtime(progress)
        self.model = LLaDA2Model(self.cfg, self.weights, self.runtime, device=self.device,
                                 dtype=self.dtype, block_length=opts.block_length)
        # On CUDA a step runs as a static program (CUDA graphs unless turned off); on the CPU
        # the eager path is as fast and simpler.
        self.model.use_program = self.device.type == "cuda"
        self.model.capture = opts.graphs

    def _build_runtime(self, progress: LoadProgress | None):
        from tidecli.experts.policies import POLICIES

        o = self.opts
        if o.policy not in POLICIES:
            raise TideError(f"unknown policy {o.policy!r}", f"choose one of {', '.join(POLICIES)}")
        budgets = self._budgets()
        if o.policy == "resident" and (budgets is None or
                                       min(budgets.values(), default=0) >= self.cfg.num_experts):
            return self._resident(progress)
        if budgets is None:  # an offload policy without a budget: the whole device's memory
            budgets = self._budgets(default_vram=True)
        return self._offload(budgets, progress)

    def _budgets(self, default_vram: bool = False) -> dict[int, int] | None:
        from tidecli.experts.budget import uniform_budget

        o, cfg = self.opts, self.cfg
        if o.experts_per_layer_map is not None:  # per-layer B_ℓ, as a plan gives them
            budgets = {int(k): int(v) for k, v in o.experts_per_layer_map.items()}
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
                raise TideError(f"--experts-per-layer must be in 0..{cfg.num_experts}",
                                "e.g. --experts-per-layer 64")
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
            elif b > plan.experts_per_layer:
                raise TideError(f"--experts-per-layer {b} does not fit --vram {vram:g} GiB "
                                f"(at most {plan.experts_per_layer})", "lower one of them")
        if b is None:
            return None
        if o.policy == "lru" and b < 1:
            raise TideError("the lru policy needs at least one expert slot per layer",
                            "raise --vram or --experts-per-layer")
        return {layer: b for layer in cfg.moe_layers}

    def _device_free_gib(self) -> float:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return free / 2**30 * 0.9
        import psutil

        return psutil.virtual_memory().available / 2**30 / 2

    def _resident(self, progress: LoadProgress | None):
        from tidecli.experts.runtime import ResidentRuntime, load_expert_pools

        total = self.ckpt.routed_expert_bytes()
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("experts", done, total)

        pools = load_expert_pools(self.ckpt, device=self.device, dtype=self.dtype, progress=tick)
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
        from tidecli.experts.store import HostExpertStore

        o = self.opts
        total = self.ckpt.routed_expert_bytes()
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("host experts", done, total)

        if o.policy == "tide":
            policy = TidePolicy(TideOptions(tau=o.tau or 4, stall_refresh=o.stall_refresh,
                                            warm_start=o.warm_start,
                                            skip_last_step=o.skip_last_step))
        elif o.policy == "lru":
            policy = LruPolicy()
        elif o.policy == "static":
            policy = StaticPolicy(self._calibration())
        else:
            policy = ResidentPolicy()
        store = HostExpertStore(self.ckpt, pin=self.device.type == "cuda", progress=tick)
        cpu_dtype = None if o.cpu_dtype == "auto" else pick_dtype(o.cpu_dtype, self.device)
        return OffloadRuntime(self.cfg, store, budgets, policy, device=self.device,
                              dtype=self.dtype, cpu_threads=o.cpu_threads, cpu_mode=o.cpu_mode,
                              cpu_dtype=cpu_dtype, kernel=o.kernel)

    def _calibration(self):
        if not self.opts.calibration:
            return None
        from tidecli.experts.trace import RoutingTrace

        tr = RoutingTrace.load(self.opts.calibration)
        if tr.num_experts != self.cfg.num_experts or tr.moe_layers != self.cfg.moe_layers:
            raise TideError("the calibration trace was recorded with another model",
                            "record one with this model: tide generate --trace FILE")
        totals = tr.array().astype("int64").sum(axis=0)
        return {layer: totals[j] for j, layer in enumerate(tr.moe_layers)}

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
        if n_prompt + settings.gen_length > limit:
            raise TideError(
                f"prompt ({n_prompt} tokens) + --gen-length {settings.gen_length} exceeds the "
                f"model's {limit} positions",
                f"shorten the prompt or use --gen-length {max(1, limit - n_prompt)} or less")

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
        if self.device.type == "cuda":
            out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out

    def close(self) -> None:
        self.runtime.close()
