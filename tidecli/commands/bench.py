"""`tide bench`: policies × budgets (× τ) on the same prompts in one process.

Imported by cli.py at start-up: nothing heavy at module level.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from tidecli.commands.checks import check_model_options
from tidecli.commands.options import (
    CpuThreadsOpt,
    ProfileOpt,
    ThresholdOpt,
    gib_list,
    model_options,
    with_options,
)
from tidecli.errors import TideError
from tidecli.experts.modes import POLICIES
from tidecli.fsutil import check_writable


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        hint = "e.g. --tau plan,1,2,4,8" if name == "tau" else f"e.g. --{name} 1,2,4,8"
        raise TideError(f"--{name} takes whole numbers", hint) from exc


def _shares(text: str, name: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise TideError(f"--{name} takes numbers from 0 to 1", f"e.g. --{name} 1,0.9,0.5") \
            from exc


def _taus(text: str) -> list[int | str]:
    """--tau: whole numbers and 'plan'."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return ["plan" if p == "plan" else _ints(p, "tau")[0] for p in parts]


def _prompts(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TideError(f"cannot read {path}: {exc.strerror or exc}",
                        "give a text file with one prompt per line") from exc
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TideError(f"{path} is not valid JSON ({exc.msg})",
                            "give a JSON list of strings, or a text file") from exc
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise TideError(f"{path} must hold a JSON list of strings",
                            'e.g. ["Hello", "Hi"]')
        prompts = items
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise TideError(f"{path} holds no prompts", "one prompt per line")
    return prompts


@with_options(model_options)
def bench(
    policies: Annotated[str, typer.Option(
        metavar="LIST", help="Policies to compare, from resident, lru, static, tide.")]
    = "resident,lru,static,tide",
    vram: Annotated[str | None, typer.Option(
        metavar="GIB,…", help="VRAM budgets in GiB, e.g. 10,18.")] = None,
    experts_per_layer: Annotated[str | None, typer.Option(
        metavar="N,…", help="Or uniform budgets in experts per layer, e.g. 8,16. Default "
                            "without --vram: a quarter and a half of the model's experts.")]
    = None,
    workloads: Annotated[str, typer.Option(
        metavar="LIST",
        help="model (the checkpoint's routing), synthetic (published LLaDA2.0-mini routing "
             "statistics, entering experts at random) and/or drifting (the same statistics "
             "from drifting router scores: entering experts foreseeable).")] = "model,synthetic",
    tau: Annotated[str, typer.Option(
        metavar="LIST",
        help="tide refresh intervals to sweep, e.g. plan,1,2,4,8 ('plan': the planner's τ and "
             "expert budgets, with its predicted step time beside the measured one).")] = "plan",
    misses: Annotated[str, typer.Option(
        metavar="LIST", help="static/tide miss placement to sweep, from auto, stream, split, "
                             "cpu, gpu (e.g. stream,split).")] = "auto",
    prefetch: Annotated[str, typer.Option(
        metavar="LIST", help="Read-ahead for streamed misses to sweep: off, layer (each "
                             "layer's experts guessed by its router) and/or step (a step's "
                             "experts guessed from the step before, copied before it runs), "
                             "e.g. off,step.")] = "off",
    guess_accuracy: Annotated[str | None, typer.Option(
        metavar="LIST",
        help="On the synthetic and drifting workloads, the read-ahead guesses with the "
             "workload's own routing, this share of each token's experts right (e.g. "
             "1,0.9,0.5): what a predictor as good as a trained model's would give.")] = None,
    guess_misses: Annotated[str, typer.Option(
        metavar="[random|ranked]",
        help="A wrong guess under --guess-accuracy: a random expert the token did not choose, "
             "or (drifting workload) the one ranked just below its choice.")] = "random",
    prompts: Annotated[Path | None, typer.Option(
        help="Prompts: text file (one per line) or JSON list; a built-in set otherwise.")]
    = None,
    gen_length: Annotated[int, typer.Option(
        help="Tokens to generate per prompt (half of generate's default: a sweep runs many "
             "times).")] = 256,
    threshold: ThresholdOpt = None,
    repeat: Annotated[int, typer.Option(help="Passes over the prompts per run.")] = 1,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the results as JSON on stdout.")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the results (JSON) to this file.")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Plot steps/s against budget (PNG).")] = None,
    traces: Annotated[Path | None, typer.Option(
        "--traces", metavar="DIR",
        help="Write each workload's routing trace to DIR/<workload>.npz (for `tide plan "
             "--trace`).")] = None,
    profile: ProfileOpt = None,
    cpu_threads: CpuThreadsOpt = 0,
    **options: Any,
) -> None:
    """Compare residency policies side by side: speed, hits, transfers, bounds."""
    spec = bench_spec(policies=policies, vram=vram, experts_per_layer=experts_per_layer,
                      workloads=workloads, tau=tau, misses=misses, prefetch=prefetch,
                      guess_accuracy=guess_accuracy, guess_misses=guess_misses,
                      prompts=prompts,
                      gen_length=gen_length, threshold=threshold, repeat=repeat,
                      experts_dtype=options.get("experts_dtype", "bf16"),
                      compile=options.get("compile") or "off")
    check_model_options(options)
    from tidecli.runtime.options import check_cpu_threads

    check_cpu_threads(cpu_threads)
    output, plot = (check_writable(p) if p is not None else None for p in (output, plot))
    if traces is not None:
        check_writable(traces / "model.npz")
    run_bench(spec=spec, json_out=json_out, output=output, plot=plot, profile=profile,
              cpu_threads=cpu_threads, traces=traces, **options)


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def bench_spec(*, policies: str, vram: str | None, experts_per_layer: str | None,
               workloads: str, tau: str, misses: str, prompts: Path | None, gen_length: int,
               prefetch: str = "off", guess_accuracy: str | None = None,
               guess_misses: str = "random",
               threshold: float | None, repeat: int, experts_dtype: str = "bf16",
               compile: str = "off"):
    """The bench's runs from its options, every value checked (before torch loads); budgets
    left empty when none are given (the model's defaults come once its config is read)."""
    from tidecli.bench.spec import PROMPTS, BenchSpec
    from tidecli.decode.settings import check_schedule
    from tidecli.experts.formats import parse_formats
    from tidecli.experts.modes import parse_misses, parse_prefetch
    from tidecli.runtime.options import parse_compile

    names = _names(policies)
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise TideError(f"unknown policy {', '.join(bad) or '(none)'}",
                        f"choose among {', '.join(POLICIES)}")
    for m in _names(misses):
        parse_misses(m)
    for m in _names(prefetch):
        parse_prefetch(m)
    for c in _names(compile):
        if c == "auto":
            raise TideError("bench compares the modes it is given: --compile auto is not one",
                            "use --compile off, on, or off,on")
        parse_compile(c, modes=("off", "on"))
    check_schedule(gen_length=gen_length, block_length=1, threshold=threshold)
    spec = BenchSpec(policies=names, vram=gib_list(vram) if vram else [],
                     experts=_ints(experts_per_layer, "experts-per-layer")
                     if experts_per_layer else [],
                     workloads=_names(workloads), taus=_taus(tau), misses=_names(misses),
                     prefetch=_names(prefetch),
                     guesses=_shares(guess_accuracy, "guess-accuracy") if guess_accuracy else [],
                     guess_misses=guess_misses,
                     prompts=_prompts(prompts) or list(PROMPTS),
                     gen_length=gen_length, threshold=threshold, repeat=repeat,
                     formats=_formats(parse_formats(experts_dtype)),
                     compile=_names(compile))
    spec.validate(need_budgets=False)
    return spec


def _formats(formats: list[str]) -> list[str]:
    """bf16 first when it is compared: the compressed formats are measured against it."""
    return (["bf16"] if "bf16" in formats else []) + [f for f in formats if f != "bf16"]


def _profile(spec: str | None):
    from tidecli.hardware.store import resolve_profile

    try:
        return resolve_profile(spec)
    except TideError:
        if spec is not None:
            raise
        return None  # no saved profile: the bounds that need one are left out


def run_bench(*, spec, json_out: bool, output: Path | None, plot: Path | None,
              profile: str | None, model, device, dtype, cpu_threads, graphs,
              experts_dtype: str = "bf16", compile: str = "off",
              traces: Path | None = None) -> None:
    from rich.console import Console

    from tidecli.bench.harness import Bench
    from tidecli.bench.report import check_plot_available, write_json, write_plot
    from tidecli.bench.spec import default_budgets
    from tidecli.commands.setup import open_engine, plans_on_this_machine
    from tidecli.model.config import load_config
    from tidecli.model.resolve import resolve_model
    from tidecli.runtime.options import engine_options
    from tidecli.ui.bench_view import (
        QUALITY_CAVEAT,
        bounds_table,
        plan_table,
        quality_table,
        routing_table,
        runs_table,
        skipped_lines,
    )
    from tidecli.ui.console import byte_progress, err

    if plot is not None:
        check_plot_available()
    folder = resolve_model(model)
    cfg = load_config(folder)
    if any(p != "resident" for p in spec.policies) and not (spec.vram or spec.experts):
        spec.experts = default_budgets(cfg)
        err.print(f"no budget given: comparing at {' and '.join(map(str, spec.experts))} "
                  f"experts per layer (of {cfg.num_experts}); --vram or --experts-per-layer "
                  "choose others", style="dim", markup=False, soft_wrap=True)
    spec.check_model(cfg)  # budgets this model cannot run fail now, not after loading it
    model = str(folder)
    threshold = spec.threshold
    prof = _profile(profile)
    # the first run's runtime is built by the bench itself; start from the resident default
    opts = engine_options(model=model, device=device, dtype=dtype, policy="resident",
                          cpu_threads=cpu_threads, graphs=graphs, profile=profile,
                          threshold=threshold, experts_dtype=spec.formats[0],
                          compile=spec.compile[0])
    planned = "tide" in spec.policies and "plan" in spec.taus and profile is None
    tide = replace(opts, residency=replace(opts.residency, policy="tide"))
    engine = open_engine(opts, build_runtime=False,
                         plans=planned and plans_on_this_machine(tide))
    with byte_progress() as progress:
        if any(p != "resident" for p in spec.policies):
            engine.host_store(progress)  # once, shared by every run (resident copies from it)
    try:
        with byte_progress() as progress:  # a later format's store may quantize or load
            bench = Bench(engine, spec, profile=prof, load_progress=progress,
                          progress=lambda msg: err.print(msg, style="dim", markup=False))
            report = bench.run()
        report["model"] = str(engine.path)
        report["device"] = str(engine.device)
        report["dtype"] = str(engine.dtype).replace("torch.", "")
        if prof is not None:
            report["profile"] = prof.name
        if engine.device.type == "cuda":
            import torch

            report["gpu"] = torch.cuda.get_device_name(engine.device)
    finally:
        engine.close()
    from tidecli import __version__

    report["tide_version"] = __version__
    # on a pipe or a log file the tables keep their width instead of folding into 80 columns
    out = err if err.is_terminal else Console(stderr=True, width=200, highlight=False)
    out.print(routing_table(report))
    out.print(runs_table(report))
    qt = quality_table(report)
    if qt is not None:
        out.print(qt)
        out.print(QUALITY_CAVEAT, style="dim", markup=False, soft_wrap=True)
    for line in skipped_lines(report):
        out.print(line, style="yellow", markup=False, soft_wrap=True)
    pt = plan_table(report)
    if pt is not None:
        out.print(pt)
    bt = bounds_table(report)
    if bt is not None:
        out.print(bt)
    elif prof is None:
        err.print("no hardware profile: the step-time bound is left out (run `tide profile`)",
                  style="dim")
    if output is not None:
        write_json(report, output)
        err.print(f"results written to {output}")
    if plot is not None:
        write_plot(report, plot)
        err.print(f"plot written to {plot}")
    if traces is not None:
        for key, trace in bench.traces.items():
            trace["trace"].save(traces / f"{key.replace(', ', '-')}.npz")
        err.print(f"routing traces written to {traces}")
    if json_out:
        sys.stdout.write(json.dumps(report) + "\n")
    runs = report["runs"]
    if runs and all(r.get("skipped") for r in runs):
        raise TideError(f"every run was skipped ({runs[0]['skipped']})",
                        "give budgets this model and device can run: --vram or "
                        "--experts-per-layer")
    bad = [r for r in report["runs"]
           if not r.get("skipped") and r["exact_expected"] and not r["identical"]]
    if bad:
        raise TideError(f"{len(bad)} run(s) that compute every expert with the GPU kernel gave "
                        "different tokens from the first such run of their workload",
                        "this is a bug: please report it with the JSON output")
