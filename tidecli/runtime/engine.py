"""The engine: a checkpoint's dense weights, tokenizer, model and expert runtime, ready to decode.

Commands build one `Engine` and ask it for prompts and decoders; it never prints (one-line facts
for the user go to `notices`). What it runs is decided before any weight is read: the plan to
follow (runtime/autoplan.py), the expert budgets and where misses run (runtime/build.py).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from tidecli.decode.diffusion import BlockDiffusionDecoder, DecodeSettings
from tidecli.decode.levenshtein import LevenshteinDecoder
from tidecli.decode.settings import check_routing_block
from tidecli.errors import TideError
from tidecli.experts.info import RuntimeInfo
from tidecli.memory import DeviceMemory
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.llada2 import LLaDA2Model
from tidecli.model.loader import dense_bytes, load_dense
from tidecli.model.moe import Router
from tidecli.model.parts import EAGER, LayerFns, compiled
from tidecli.model.program import StepPrograms
from tidecli.model.resolve import demo_path, resolve_model
from tidecli.model.tokenizer import ChatTokenizer
from tidecli.planner.plan import Plan, PlanSummary
from tidecli.runtime import build
from tidecli.runtime.autoplan import follows_plan, plan_for
from tidecli.runtime.devices import compile_missing, pick_device, pick_dtype, set_cpu_threads
from tidecli.runtime.facts import device_free_gib, machine_facts, routed_bytes
from tidecli.runtime.options import BudgetOptions, EngineOptions, ResidencyOptions

# progress(stage, done_bytes, total_bytes)
LoadProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EngineInfo:
    """What an engine runs (the start-up panel, `--json`)."""

    runtime: RuntimeInfo
    model: str = ""
    device: str = ""
    dtype: str = ""
    memory: DeviceMemory | None = None  # the VRAM split the expert budgets were fitted into
    plan: PlanSummary | None = None  # the planner's plan the runtime follows
    peak_allocated_bytes: int | None = None
    choice: str | None = None  # what `--policy auto` chose, and why
    cpu_threads: int | None = None  # on a CPU device: the threads the model runs on
    demo: bool = False  # the built-in demo model (random weights)
    compiled: bool = False  # the step's layer functions run compiled (--compile on)

    def to_dict(self) -> dict:
        out = {"model": self.model, "device": self.device, "dtype": self.dtype,
               **self.runtime.to_dict()}
        if self.cpu_threads is not None:
            out["cpu_threads"] = self.cpu_threads
        if self.demo:
            out["demo"] = True
        if self.compiled:
            out["compiled"] = True
        if self.memory is not None:
            out["memory_plan"] = self.memory.to_dict()
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        if self.peak_allocated_bytes is not None:
            out["peak_allocated_bytes"] = self.peak_allocated_bytes
        if self.choice is not None:
            out["policy_choice"] = self.choice
        return out


class Engine:
    def __init__(self, opts: EngineOptions, *, progress: LoadProgress | None = None,
                 quiet: bool = False, build_runtime: bool = True) -> None:
        opts.validate()
        self.opts = opts
        self.notices: list[str] = []  # one-line facts a command shows the user
        self.path = resolve_model(opts.load.model, quiet=quiet)
        self.ckpt = Checkpoint.open(self.path)
        self.cfg = self.ckpt.config
        self.format = build.experts_format(self.ckpt, opts.load.experts_dtype)
        self.tokenizer = ChatTokenizer(self.path)
        self.device = pick_device(opts.load.device)
        self.dtype = pick_dtype(opts.load.dtype, self.device)
        # --compile auto: on where it can run (no note where it cannot); if compiling then
        # fails, the steps run eager (StepPrograms falls back, with a note) instead of stopping
        self.compile_fallback = opts.load.compile == "auto"
        if self.compile_fallback:
            mode = "on" if compile_missing(self.device) is None else "off"
            opts = self.opts = replace(opts, load=replace(opts.load, compile=mode))
        if self.device.type == "cpu" and self.dtype == torch.float16:
            self.notices.append("fp16 on the CPU is slow (no fp16 units): bf16 or fp32 run "
                                "faster")
        self.cpu_threads = set_cpu_threads(opts.residency.cpu_threads)
        DecodeSettings(block_length=opts.workload.block_length).validate(
            self.cfg.max_position_embeddings)
        self._check_model_format(opts.workload.block_length)
        self._free_vram = device_free_gib(self.device)  # before the weights take their share
        self._auto_plans: dict[tuple, Plan] = {}  # the planner's plan per option set
        self._configure()  # refuses bad options before any weight is read
        self.weights = load_dense(self.ckpt, device=self.device, dtype=self.dtype,
                                  embed_device=torch.device("cpu"),  # a step reads 32 rows
                                  progress=self._ticker(progress, "dense weights",
                                                        dense_bytes(self.ckpt)))
        self._store = None  # the host expert store, kept across runtime changes
        # without a runtime (set_runtime builds one later) the model cannot run yet
        self.runtime = self._build(progress) if build_runtime else None
        self.model = LLaDA2Model(self.cfg, self.weights, self.runtime, device=self.device,
                                 dtype=self.dtype, block_length=opts.workload.block_length)
        # on a GPU a step runs as a static program (CUDA graphs unless turned off), its layer
        # functions compiled when asked; on the CPU the eager path is as fast and simpler
        self._compiled: LayerFns | None = None
        fns = self.layer_fns(opts.load.compile)
        self.runner = StepPrograms(self.model, capture=opts.load.graphs, fns=fns,
                                   fallback=EAGER if self.compile_fallback else None,
                                   notices=self.notices) \
            if self.device.type == "cuda" else self.model

    # ---- what runs ------------------------------------------------------------------------------

    def _configure(self) -> None:
        """Facts, the policy (`auto` resolved), the plan to follow, where misses run and the
        expert budgets. `self.run_opts` are the options with the policy resolved."""
        self.facts = machine_facts(self.ckpt, self.opts, self.device, self.dtype,
                                   free_vram_gib=self._free_vram, fmt=self.format)
        policy, self.choice = build.choose_policy(self.ckpt, self.opts, self.facts)
        o = self.run_opts = replace(self.opts, residency=replace(self.opts.residency,
                                                                 policy=policy))
        self.ignored = o.ignored(cuda=self.device.type == "cuda")
        self.plan = o.plan
        if self.plan is None and follows_plan(o, cuda=self.device.type == "cuda"):
            key = (o.budgets, o.residency.misses, o.residency.profile, o.workload,
                   o.load.experts_dtype, o.load.compile)
            if key not in self._auto_plans:
                self._auto_plans[key] = plan_for(self.cfg, o, self.facts, model=self.path,
                                                 notices=self.notices)
            self.plan = self._auto_plans[key]
        self.misses = build.miss_mode(o, self.facts, self.plan)
        self.budgets, self.memory = build.expert_budgets(self.ckpt, o, plan=self.plan,
                                                         facts=self.facts, mode=self.misses)
        build.check_resident(self.ckpt, o, self.budgets)

    def _build(self, progress: LoadProgress | None):
        o, budgets = self.run_opts, self.budgets
        if o.residency.policy == "resident" and (
                budgets is None or min(budgets.values(), default=0) >= self.cfg.num_experts):
            return build.resident_runtime(self.ckpt, o, self._store, device=self.device,
                                          dtype=self.dtype, tick=self._expert_ticker(progress),
                                          ticker=self._stage_ticker(progress),
                                          notices=self.notices)
        if budgets is None:  # an offload policy without a budget: the whole device's memory
            budgets, self.memory = self._default_budgets()
        rt = build.pooled_runtime(self.ckpt, o, self.host_store(progress), budgets,
                                  plan=self.plan, device=self.device, dtype=self.dtype)
        # (with lru, `ignored` says it already: no policy of its kind reads ahead)
        if o.residency.prefetch != "off" and not (rt.prefetches or rt.prefetches_steps) and \
                o.residency.policy in ("static", "tide"):
            self.notices.append(f"--prefetch {o.residency.prefetch} reads ahead only for "
                                f"streamed misses; these run {rt.describe().misses}: no "
                                "read-ahead")
        return rt

    def _default_budgets(self):
        budgets, memory = build.expert_budgets(self.ckpt, self.run_opts, plan=self.plan,
                                               facts=self.facts, mode=self.misses,
                                               default_vram=True)
        build.check_resident(self.ckpt, self.run_opts, budgets)
        return budgets, memory

    def set_runtime(self, progress: LoadProgress | None = None, *,
                    residency: ResidencyOptions | None = None,
                    budgets: BudgetOptions | None = None,
                    experts_dtype: str | None = None) -> None:
        """Replace the expert runtime with one built from other residency options, budgets or
        experts' format; the dense weights (and the host store, unless the format changes) are
        kept. Compares policies and formats in one process."""
        if self.runtime is not None:
            self.runtime.close()
        self.model.experts = self.runtime = None
        load = self.opts.load
        if experts_dtype is not None and experts_dtype != load.experts_dtype:
            load = replace(load, experts_dtype=experts_dtype)
            self.format = build.experts_format(self.ckpt, experts_dtype)
            if self._store is not None:  # another format's rows: a new store
                self._store.close()
                self._store = None
        if self.device.type == "cuda":
            gc.collect()  # the old runtime's device buffers, if a cycle still holds them
            torch.cuda.empty_cache()
        self.opts = replace(self.opts, load=load, residency=residency or self.opts.residency,
                            budgets=budgets or self.opts.budgets)
        self.opts.validate()
        self._configure()
        self.runtime = self._build(progress)
        self.model.experts = self.runtime
        self.reset_programs()

    def layer_fns(self, mode: str) -> LayerFns:
        """The step's layer functions for `--compile mode`: eager, or compiled (one set per
        engine: its compiled code is reused by every later program). Where compiling cannot
        run, one note says why and the step runs eager."""
        if mode == "off":
            return EAGER
        why = compile_missing(self.device)
        if why is not None:
            self.notices.append(f"--compile {mode}: {why}; the step runs uncompiled")
            return EAGER
        if self._compiled is None:
            self._compiled = compiled()
            how = "auto" if self.compile_fallback else "on"
            self.notices.append(f"--compile {how}: the first step compiles its kernels (longest "
                                "the first time on this machine; cached after)")
        return self._compiled

    def set_compile(self, mode: str) -> bool:
        """Run later steps with `--compile mode`'s functions (a runtime built after this plans
        with their saved corrections); False where they cannot run."""
        self.opts = replace(self.opts, load=replace(self.opts.load, compile=mode))
        fns = self.layer_fns(mode)
        if isinstance(self.runner, StepPrograms) and self.runner.fns is not fns:
            self.runner.fns = fns
            self.runner.reset()
        return fns.name == ("compiled" if mode == "on" else "eager")

    def set_router(self, router: Router | None) -> None:
        """Replace the model's expert choice (benchmarks: a synthetic workload); None restores
        the model's own routing."""
        self.model.router = router or Router()
        self.reset_programs()

    def reset_programs(self) -> None:
        """Capture the step programs again (after anything they read changed)."""
        if isinstance(self.runner, StepPrograms):
            self.runner.reset()

    def host_store(self, progress: LoadProgress | None = None):
        """The routed experts on the host, loaded once and kept (runtime/build.py)."""
        if self._store is None:
            self._store = build.host_store(
                self.ckpt, self.run_opts, plan=self.plan, facts=self.facts, device=self.device,
                tick=self._expert_ticker(progress, "host experts"), notices=self.notices,
                static_budgets=lambda: self._default_budgets()[0],
                ticker=self._stage_ticker(progress))
        return self._store

    @staticmethod
    def _ticker(progress: LoadProgress | None, stage: str, total: int) -> Callable[[int], None]:
        """tick(n) adds n bytes to `stage`'s progress out of `total`."""
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(stage, done, total)
        return tick

    def _expert_ticker(self, progress: LoadProgress | None, stage: str = "experts"):
        return self._ticker(progress, stage, routed_bytes(self.ckpt, self.format))

    def _stage_ticker(self, progress: LoadProgress | None):
        """(stage, total bytes) → a tick for a stage of its own (quantizing, reading a cache)."""
        return lambda stage, total: self._ticker(progress, stage, total)

    # ---- prompts and generations ----------------------------------------------------------------

    def prompt_ids(self, prompt: str, *, system: str | None = None, raw: bool = False,
                   history: list[dict[str, str]] | None = None) -> list[int]:
        if not prompt.strip():
            raise TideError("the prompt is empty", "give some text to start from")
        if raw:
            ids = self.tokenizer.encode(prompt)
        else:
            messages = [{"role": "system", "content": system}] if system else []
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

    def _check_model_format(self, block_length: int) -> None:
        """LLaDA2.2: the decode block covers whole routing blocks; the edit tokens are neither
        the mask nor a stop id."""
        cfg, t = self.cfg, self.tokenizer.ids
        check_routing_block(block_length=block_length,
                            routing_block=cfg.block_size if cfg.block_routing else 0)
        clash = set(cfg.edit_token_ids or ()) & ({t.mask} | t.stop)
        if clash:
            raise TideError(f"config.json's edit token id {min(clash)} is also the mask or a "
                            "stop id of the tokenizer",
                            "fix delete_token_id / split_token_id in config.json")

    def decode_settings(self, settings: DecodeSettings) -> DecodeSettings:
        """`settings` with this checkpoint's decoding and its presets (Levenshtein for one with
        edit tokens, unless another is asked for)."""
        return settings.resolved(edit_tokens=self.cfg.edit_token_ids is not None)

    def decoder(self, ids: list[int], settings: DecodeSettings) -> BlockDiffusionDecoder:
        settings = self.decode_settings(settings)
        settings.validate(self.cfg.max_position_embeddings)
        self._check_model_format(settings.block_length)
        self.check_length(len(ids), settings)
        t = self.tokenizer.ids
        if settings.decoding == "levenshtein":
            return LevenshteinDecoder(self.runner, ids, settings, mask_id=t.mask,
                                      eos_ids=set(t.stop), edit_ids=self.cfg.edit_token_ids,
                                      device=self.device)
        return BlockDiffusionDecoder(self.runner, ids, settings, mask_id=t.mask,
                                     eos_ids=set(t.stop), device=self.device,
                                     output_vocab=len(self.tokenizer))

    def describe(self) -> EngineInfo:
        peak = int(torch.cuda.max_memory_allocated(self.device)) \
            if self.device.type == "cuda" else None
        return EngineInfo(model=str(self.path), device=str(self.device),
                          dtype=str(self.dtype).replace("torch.", ""),
                          runtime=self.runtime.describe(), memory=self.memory,
                          plan=self.plan.summary() if self.plan is not None else None,
                          peak_allocated_bytes=peak, choice=self.choice,
                          cpu_threads=self.cpu_threads if self.device.type == "cpu" else None,
                          demo=self.is_demo, compiled=self.compiled)

    @property
    def compiled(self) -> bool:
        """Do the steps run the compiled layer functions (`--compile on` where it can)?"""
        return isinstance(self.runner, StepPrograms) and self.runner.fns.name == "compiled"

    @property
    def is_demo(self) -> bool:
        """Is this the built-in demo model (random weights, for trying the tool)?"""
        return self.path.resolve() == demo_path().resolve()

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
