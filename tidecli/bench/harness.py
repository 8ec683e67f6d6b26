"""The benchmark harness: every workload × budget × policy (× τ) in one process.

The dense weights and the host expert store are loaded once; each run swaps the expert runtime
(engine.set_runtime), warms up (CUDA graphs captured, caches filled), then generates the same
prompts with the same settings. Every run of a workload that computes every expert with the GPU
kernel must give the tokens of the first such run (the policies are lossless); a mismatch is
reported, never hidden. Runs with CPU misses are compared with that run too (their agreement).

With several formats of the routed experts (`--experts-dtype bf16,int8,fp8,int4`) every run is
made once per format, the formats one after the other (each with its own host store); the
exactness check compares runs of one format, and each compressed format is compared with bf16
(bench/quality.py): its tokens, its logits on the same inputs, its experts' outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from tidecli.bench.bounds import bound_rows, trace_key
from tidecli.bench.oracle import agreement, routing_stats
from tidecli.bench.report import add_ratios
from tidecli.bench.spec import SCHEMA, BenchSpec, RunPoint, run_points
from tidecli.errors import OutOfDeviceMemory, TideError
from tidecli.experts.modes import parse_misses
from tidecli.experts.trace import RoutingTrace
from tidecli.model.counters import LayerCounters

Progress = Callable[[str], None]


def _plan_fields(eng, measured_ms: float | None, trace: RoutingTrace | None = None) -> dict:
    """A planned run: the τ used, and the plan's predicted step time against the measured one
    (denoising steps only), also with the workload's own routing statistics (`trace`) in place
    of the published ones. On a CPU device without --profile nothing is planned (τ 4)."""
    plan = eng.plan
    if plan is None:
        return {"planned": False, "tau": eng.runtime.describe().tau}
    out = {"planned": True, "tau": plan.tau, "plan_profile": plan.profile,
           "predicted_step_ms": round(plan.predicted_step_ms, 3),
           "predicted_parts": plan.breakdown.to_dict(),
           "plan_calibrated": "calibration" in plan.constants}
    if measured_ms:
        out["measured_over_predicted"] = round(measured_ms / plan.predicted_step_ms, 4)
    if trace is not None and len(trace):
        from tidecli.runtime.autoplan import predicted_with_trace

        try:
            own = predicted_with_trace(eng.cfg, eng.run_opts, plan, trace, model=eng.path)
        except Exception as exc:  # noqa: BLE001 - a diagnostic column must not end the bench
            out["predicted_own_routing_error"] = f"{type(exc).__name__}: {exc}"[:200]
            return out
        out["predicted_own_routing_ms"] = round(own.step_ms, 3)
        out["predicted_own_routing_parts"] = own.to_dict()  # where the model puts the time
        if measured_ms:
            out["measured_over_predicted_own_routing"] = round(measured_ms / own.step_ms, 4)
    return out


def _joined(traces: list[RoutingTrace]) -> RoutingTrace:
    """The prompts' step traces as one, each prompt's blocks kept apart."""
    first = traces[0]
    out = RoutingTrace(first.num_layers, first.num_experts, list(first.moe_layers),
                       meta=dict(first.meta))
    for i, tr in enumerate(traces):
        for counts, kind, block, step, tokens in zip(tr.counts, tr.kinds, tr.blocks, tr.steps,
                                                     tr.tokens, strict=True):
            out.append(counts, kind=kind, block=block + 1000 * i, step=step, tokens=tokens)
    return out


class Bench:
    def __init__(self, engine, spec: BenchSpec, *, profile=None,
                 progress: Progress | None = None, load_progress=None) -> None:
        spec.validate()
        self.engine = engine
        self.spec = spec
        self.profile = profile
        self.say = progress or (lambda msg: None)
        self.load_progress = load_progress  # (stage, done, total): loading or quantizing
        self.prompt_ids = [engine.prompt_ids(p) for p in spec.prompts]
        # (workload, format, compile) → the reference run's tokens, and the runs waiting for one
        self.expected: dict[tuple, list[list[int]]] = {}
        self.pending: dict[tuple, list[tuple[dict, list[list[int]]]]] = {}
        self.traces: dict[str, dict] = {}
        self.router = None  # a synthetic workload's routing, while one runs
        # several formats: each compared with bf16 (tokens, logits, expert outputs)
        self.formats = None
        if spec.compares_formats:
            from tidecli.bench.quality import FormatComparison
            self.formats = FormatComparison(self.prompt_ids)

    # ---- one generation -------------------------------------------------------------------------

    def _settings(self, gen_length: int):
        from tidecli.decode.diffusion import DecodeSettings

        return DecodeSettings(gen_length=gen_length, threshold=self.spec.threshold,
                              block_length=self.engine.opts.workload.block_length)

    def _generate(self, ids: list[int], gen_length: int):
        """The result; the milliseconds and expert counters of its denoising steps alone (no
        prefill, no commit passes: what a step-time model or bound describes); the seconds
        until its first step's tokens, and the milliseconds before that step began (the
        prompt's prefill)."""
        d = self.engine.decoder(ids, self._settings(gen_length))
        step_ms = 0.0
        counters = LayerCounters()
        first = None
        for ev in d.steps():
            if first is None:
                first = (ev.elapsed_s, ev.elapsed_s * 1000 - ev.forward_ms)
            step_ms += ev.forward_ms
            if ev.experts is not None:
                counters.add(ev.experts)
        return d.result, step_ms, counters, first or (0.0, 0.0)

    def _set_workload(self, name: str) -> None:
        router = None
        if name != "model":
            router = _router_class(name)(self.engine.cfg, device=self.engine.device,
                                         block_length=self.engine.opts.workload.block_length,
                                         seed=self.spec.seed)
        self.engine.set_router(router)
        self.router = router

    def _ready_routing(self, accuracy: float | None, *, predict: bool = False) -> None:
        """A synthetic workload's routing for the next run, drawn before any step is timed
        (SyntheticRouting.prepare), with the read-ahead's guess set to `accuracy`, or None for
        the model's router (a captured step reads one or the other: captured again on a
        change); `predict`: the step read-ahead guesses from the step before."""
        if self.router is None:
            return
        if self.router.guess_accuracy != accuracy:
            self.router.guess_accuracy = accuracy
            self.engine.reset_programs()
        self.router.guess_misses = self.spec.guess_misses
        self.router.predict_steps = predict and accuracy is None
        bl = self.engine.opts.workload.block_length
        longest = max(len(ids) for ids in self.prompt_ids) + self.spec.gen_length
        self.router.prepare(blocks=-(-longest // bl), steps=bl)

    # ---- a trace per workload (routing statistics and the oracle) -------------------------------

    def _record_trace(self, workload: str, key: str) -> None:
        """The routing of `workload` as this engine runs it now (compiled steps decode their own
        way), under `key`."""
        rt = self.engine.runtime
        counts, blocks, per_prompt, traces = [], [], [], []
        for ids in self.prompt_ids:
            tr = rt.enable_trace()
            self.engine.reset_programs()  # the captured step must record the routing too
            self._generate(ids, self.spec.gen_length)
            rt.trace = None
            steps = tr.steps_only()
            traces.append(steps)
            arr = steps.array()
            counts.append(arr)
            blocks.extend(b + 1000 * len(per_prompt) for b in steps.blocks)
            per_prompt.append(tr.array())  # every forward, in order, for the oracle
        self.engine.reset_programs()
        stats = routing_stats(np.concatenate(counts), blocks)
        self.traces[key] = {"stats": stats, "forwards": per_prompt, "steps": counts,
                            "trace": _joined(traces), "label": _label(workload)}

    # ---- runs -----------------------------------------------------------------------------------

    def _measure(self, pt: RunPoint) -> dict:
        import torch

        eng = self.engine
        cuda = eng.device.type == "cuda"
        spec = self.spec
        self._generate(self.prompt_ids[0], min(spec.warmup_tokens, spec.gen_length))
        if cuda:
            torch.cuda.synchronize(eng.device)
            torch.cuda.reset_peak_memory_stats(eng.device)
            at_start = torch.cuda.memory_allocated(eng.device)
        eng.runtime.reset_stats()
        tokens = steps = 0
        wall = denoise_ms = first_s = before_ms = 0.0
        outputs = []
        in_steps = LayerCounters()  # the denoising steps' counters alone
        for _ in range(spec.repeat):
            for ids in self.prompt_ids:
                res, ms, counters, (first, before) = self._generate(ids, spec.gen_length)
                denoise_ms += ms
                first_s += first
                before_ms += before
                in_steps.add(counters)
                tokens += len(res.token_ids)
                steps += res.steps
                wall += res.wall_seconds
                outputs.append(res.token_ids)
        s = eng.runtime.run_stats.summary()
        used = eng.runtime.describe().misses if pt.misses is not None else None
        # what exactness promises: the GPU kernel computes every expert (see README)
        exact = pt.policy in ("resident", "lru") or used in ("gpu", "stream")
        row = {
            "workload": pt.workload, "policy": pt.policy, "budget": pt.budget,
            "vram_gib": pt.vram, "tau": pt.tau, "misses": pt.misses, "misses_used": used,
            "experts_per_layer": _budgets(eng),
            "tokens": tokens, "steps": steps, "wall_s": round(wall, 4),
            "tokens_per_s": round(tokens / wall, 3) if wall else 0.0,
            "steps_per_s": round(steps / wall, 3) if wall else 0.0,
            "tokens_per_step": round(tokens / steps, 3) if steps else 0.0,
            "step_ms": round(1000 * wall / steps, 3) if steps else None,  # wall / steps
            "denoise_step_ms": round(denoise_ms / steps, 3) if steps else None,
            # per prompt: until the first step's tokens; before that step (the prefill); the
            # rest of the wall outside the denoising steps (commit passes, the decoder's work)
            "first_step_s": round(first_s / len(outputs), 4),
            "prefill_ms": round(before_ms / len(outputs), 3),
            "outside_steps_ms": round((1000 * wall - denoise_ms - before_ms) / len(outputs), 3),
            "hit_rate": round(s["hit_rate"], 4),
            "cpu_share": round(s["cpu_share"], 4),
            "cpu_calls": s["cpu_calls"],
            "fetched_calls": s["fetched_calls"],
            "h2d_gb": round(s["bytes_h2d"] / 1e9, 4),
            "promotions": s["promotions"],
            "stall_ms": s["stall_ms"],
            # what the runtime times as it runs (events and host clocks, no extra syncs), per
            # denoising step and over the denoising steps alone (what the planner's parts
            # describe; the counts above are of every forward, prefill included): copy-stream
            # time, CPU time on misses, the GPU waiting for either, the host waiting for disk
            "measured_parts_ms": {k: round(getattr(in_steps, k) / steps, 3) if steps else None
                                  for k in ("copy_ms", "cpu_ms", "stall_ms", "disk_wait_ms")},
            "step_hit_rate": round(in_steps.hit_rate, 4),
            "step_cpu_calls": round(in_steps.cpu_calls / steps, 2) if steps else None,
            "step_promotions": round(in_steps.promotions / steps, 2) if steps else None,
            # read-ahead: what it read, and how much of that its layer then used
            "prefetch": eng.runtime.describe().prefetch,
            # the guess's set accuracy on a synthetic workload (None: the model's router)
            "guess_accuracy": pt.guess,
            "guess_misses": self.spec.guess_misses if pt.guess is not None else None,
            "prefetched": s["prefetched"],
            "prefetch_accuracy": round(s["prefetch_accuracy"], 4)
            if s["prefetch_accuracy"] is not None else None,
            "wasted_h2d_gb": round(s["bytes_prefetch_wasted"] / 1e9, 4),
            # forwards its gate held the read-ahead off (its guesses were not used enough)
            "prefetch_off_forwards": s["prefetch_off_forwards"],
            "peak_vram_gib": round(torch.cuda.max_memory_allocated(eng.device) / 2**30, 3)
            if cuda else None,
            # allocated before the run's first step: the engine, and whatever else this process
            # holds (the peak counts it too)
            "vram_at_start_gib": round(at_start / 2**30, 3) if cuda else None,
            "exact_expected": exact,
            **({"compiled": True} if pt.compile == "on" else {}),
        }
        self._compare(row, (pt.workload, pt.fmt, pt.compile), outputs)
        if pt.planned:
            row.update(_plan_fields(eng, row["denoise_step_ms"],
                                    self.traces.get(trace_key(pt.workload, pt.compile == "on"),
                                                    {}).get("trace")))
        if self.formats is not None:
            row.update(self.formats.run_fields(eng, pt.fmt, pt.workload, outputs))
        return row

    def _compare(self, row: dict, key: tuple, outputs: list[list[int]]) -> None:
        """`identical` and `token_agreement` against the group's reference: its first run that
        computes every expert with the GPU kernel. Runs before it (CPU misses, say) wait for it;
        a group without one is compared with its first run (`_settle`)."""
        want = self.expected.get(key)
        if want is None and row["exact_expected"]:
            want = self.expected[key] = outputs
            for earlier, out in self.pending.pop(key, []):
                _set_comparison(earlier, out, want)
        if want is None:
            self.pending.setdefault(key, []).append((row, outputs))
        else:
            _set_comparison(row, outputs, want)

    def _settle(self, key: tuple | None) -> None:
        """A group ended without a run the GPU kernel computed whole: its first run is the
        reference."""
        waiting = self.pending.pop(key, [])
        for row, out in waiting:
            _set_comparison(row, out, waiting[0][1])

    def run(self) -> dict:
        spec = self.spec
        used = self.engine.decode_settings(self._settings(spec.gen_length))
        runs: list[dict] = []
        points = run_points(spec)
        base = self.engine.opts
        current = None
        for n, pt in enumerate(points, 1):
            if (pt.workload, pt.fmt, pt.compile) != current:
                self._settle(current)
                current = (pt.workload, pt.fmt, pt.compile)
                self._set_workload(pt.workload)
                self.expected.pop(current, None)
            label = f"[{n}/{len(points)}] " + \
                ("compiled · " if pt.compile == "on" else "") + \
                (f"{pt.fmt} · " if spec.compares_formats else "") + \
                f"{pt.workload} · {pt.policy} · {pt.budget}" + \
                (f" · τ={pt.tau}" if pt.tau is not None else "") + \
                (" · planned" if pt.planned else "") + \
                (f" · misses {pt.misses}" if pt.misses is not None else "") + \
                (f" · prefetch {pt.prefetch}" if pt.prefetch != "off" else "") + \
                (f" · guess {pt.guess:.0%}" if pt.guess is not None else "")
            self.say(label)
            try:
                if pt.prefetch == "step" and pt.guess is None and pt.workload == "synthetic":
                    runs.append(_skipped(pt, "this workload draws the experts that enter a step "
                                             "at random: nothing guesses them"))
                    continue
                if not self.engine.set_compile(pt.compile):  # says why in a notice
                    why = "; ".join(self.engine.notices) or "the step cannot run compiled here"
                    self.engine.notices.clear()
                    runs.append(_skipped(pt, why))
                    continue
                self._ready_routing(pt.guess, predict=pt.prefetch == "step")
                self.engine.set_runtime(self.load_progress, residency=replace(
                    base.residency, policy=pt.policy, tide=replace(base.residency.tide,
                                                                   tau=pt.tau),
                    misses=parse_misses(pt.misses or "auto"), prefetch=pt.prefetch),
                    budgets=replace(
                    base.budgets, vram_gib=pt.vram, experts_per_layer=pt.experts),
                    experts_dtype=pt.fmt)
                rt = self.engine.runtime
                if pt.prefetch != "off" and not (rt.prefetches or rt.prefetches_steps):
                    self.engine.notices.clear()
                    runs.append(_skipped(pt, f"read-ahead needs streamed misses; these run "
                                             f"{rt.describe().misses}"))
                    continue
                for note in self.engine.notices:  # a cache built or rebuilt, say
                    self.say(f"note: {note}")
                self.engine.notices.clear()
                key = trace_key(pt.workload, pt.compile == "on")
                if key not in self.traces:
                    self._record_trace(pt.workload, key)
                runs.append(self._measure(pt))
            except (TideError, OutOfDeviceMemory) as exc:
                runs.append(_skipped(pt, exc.message))
            except Exception as exc:  # noqa: BLE001 - only a device OOM is survivable
                if type(exc).__name__ != "OutOfMemoryError":
                    raise
                runs.append(_skipped(pt, "out of device memory"))
        self._settle(current)
        add_ratios(runs)
        extra = {"formats": self.formats.figures} if self.formats is not None else {}
        return {
            "schema": SCHEMA,
            "date": time.strftime("%Y-%m-%d"),
            "settings": {"gen_length": spec.gen_length, "threshold": used.threshold,
                         "decoding": used.decoding,
                         "repeat": spec.repeat, "prompts": len(spec.prompts),
                         "block_length": self.engine.opts.workload.block_length},
            "workloads": {k: {"label": t["label"], "routing": t["stats"]}
                          for k, t in self.traces.items()},
            "runs": runs,
            "bounds": bound_rows(self.engine, self.profile, self.traces, self.spec.repeat, runs),
            **extra,
        }


def _skipped(pt: RunPoint, why: str) -> dict:
    return {"workload": pt.workload, "policy": pt.policy, "budget": pt.budget,
            "vram_gib": pt.vram, "tau": pt.tau, "misses": pt.misses, "prefetch": pt.prefetch,
            "guess_accuracy": pt.guess, "skipped": why,
            **({"experts_dtype": pt.fmt} if pt.fmt != "bf16" else {}),
            **({"compiled": True} if pt.compile == "on" else {})}


def _router_class(workload: str):
    from tidecli.bench.synthetic import DriftingRouting, SyntheticRouting

    return {"synthetic": SyntheticRouting, "drifting": DriftingRouting}[workload]


def _label(workload: str) -> str:
    return "the model's own routing" if workload == "model" else _router_class(workload).label


def _budgets(engine) -> dict[str, int]:
    b = getattr(engine.runtime, "budgets", None)
    if b is None:
        return {str(layer): engine.cfg.num_experts for layer in engine.cfg.moe_layers}
    return {str(k): int(v) for k, v in b.items()}


def _set_comparison(row: dict, outputs: list[list[int]], want: list[list[int]]) -> None:
    row["identical"] = outputs == want
    row["token_agreement"] = round(agreement(outputs, want), 4)
