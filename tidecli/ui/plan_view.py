"""Rich tables for `tide plan`: the plan, and predicted vs measured after --calibrate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tidecli.ui.console import err
from tidecli.units import GIB

if TYPE_CHECKING:
    from tidecli.planner.plan import Plan
    from tidecli.planner.report import CalibrationReport


def num(x: float) -> str:
    """A figure rounded for reading: 1,175 · 87.3 · 4.21 · 0.083."""
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.1 or ax == 0:
        return f"{x:.2f}"
    return f"{x:.2g}"


def size(n: int) -> str:
    """Bytes as GiB (MiB below one GiB), rounded for reading."""
    if n < GIB:
        return f"{num(n / 2**20)} MiB"
    return f"{num(n / GIB)} GiB"


def _budgets(plan: Plan) -> str:
    bs = list(plan.experts_per_layer.values())
    if not bs:
        return "no MoE layers"
    if plan.uniform:
        return (f"{bs[0]} of {plan.num_experts or bs[0]} per layer ({len(bs)} MoE layer"
                f"{'s' if len(bs) > 1 else ''})")
    return f"{min(bs)}–{max(bs)} per layer (mean {sum(bs) / len(bs):.1f})"


def _tier_rows(plan: Plan) -> list[tuple[str, str]]:
    """Where the routed experts live: GPU slots, host RAM (+ staging ring), disk."""
    tiers = plan.tiers()
    gpu, ram, disk = tiers["gpu"], tiers["ram"], tiers["disk"]
    rows = [("tier 1: GPU", f"{gpu['experts']} expert slots, {size(gpu['bytes'])}")]
    if plan.policy == "resident":
        return rows  # every expert on the GPU: the host holds none for the step
    if not plan.tiered:
        rows.append(("tier 2: RAM", f"all {ram['experts']} experts, {size(ram['bytes'])} pinned"
                     + (f" (of {size(ram['budget_bytes'])} for experts)"
                        if ram["budget_bytes"] else "")))
        return rows
    per = list(plan.experts_in_ram.values())
    spread = f"{per[0]}" if len(set(per)) == 1 else f"{min(per)}–{max(per)}"
    rows.append(("tier 2: RAM", f"{ram['experts']} experts ({spread} per layer), "
                 f"{size(ram['bytes'])} pinned + staging ring {ram['staging_experts']} × "
                 f"{size(plan.expert_bytes)} (budget {size(ram['budget_bytes'])})"))
    rows.append(("tier 3: disk", f"{disk['experts']} experts, {size(disk['bytes'])}, read when "
                 f"missed at {disk['read_gbps']:g} GB/s"))
    return rows


def _predicted(plan: Plan) -> str:
    return (f"[bold]{num(plan.predicted_step_ms)} ms[/bold] · {num(plan.steps_per_s)} steps/s · "
            f"[bold]{num(plan.tokens_per_s)} tokens/s[/bold]")


def _breakdown_rows(plan: Plan) -> list[tuple[str, str]]:
    """The predicted step in parts; parts that do not apply to this plan are left out."""
    bd = plan.breakdown
    rows = [("  GPU dense", f"{num(bd.gpu_dense_ms)} ms")]
    if plan.policy == "resident":
        rows.append(("  GPU experts", f"{num(bd.gpu_expert_ms)} ms"))
        return rows
    rows.append(("  GPU experts", f"{num(bd.gpu_expert_ms)} ms (hit rate "
                                  f"{bd.hit_rate * 100:.1f}%)"))
    if plan.misses == "stream":
        rows.append(("  PCIe misses", f"{num(bd.pcie_ms)} ms (read by the GPU, "
                                      f"{bd.promotions_per_step:.1f} experts/step kept)"))
    else:
        rows.append(("  CPU misses", f"{num(bd.cpu_miss_ms)} ms, of which the GPU waits "
                                     f"{num(bd.cpu_stall_ms)} ms"))
        rows.append(("  PCIe promotions", f"{num(bd.pcie_ms)} ms ({bd.promotions_per_step:.1f} "
                                          f"experts/step), stall {num(bd.pcie_stall_ms)} ms"))
    if bd.host_ms:
        rows.append(("  host hand-offs", f"{num(bd.host_ms)} ms (each MoE layer's routing read "
                                         "by the host)"))
    if plan.tiered:
        rows.append(("  disk reads", f"{num(bd.disk_ms)} ms ({bd.disk_reads_per_step:.1f} "
                                     f"experts/step), stall {num(bd.disk_stall_ms)} ms beyond "
                                     "the CPU's"))
    return rows


def plan_table(plan: Plan, *, verbose: bool = False) -> Table:
    """One plan, the rows a person choosing hardware reads; `verbose` adds the τ cost curve,
    the routing figures and the uniform/per-layer alternatives."""
    t = Table(title=f"tide plan · {escape(plan.model)} on {escape(plan.profile)}",
              show_header=False,
              title_justify="left", pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("VRAM budget", f"{size(plan.vram_budget_bytes)}: dense {size(plan.dense_bytes)} + "
              f"KV {size(plan.kv_cache_bytes)} ({plan.context_tokens} tokens) + workspace "
              f"{size(plan.workspace_bytes)} + expert slots {size(plan.slot_bytes)}")
    t.add_row("policy", plan.policy + (" (every expert fits the budget)"
                                        if plan.policy == "resident" else ""))
    if plan.experts_format != "bf16":
        t.add_row("experts", f"{plan.experts_format}: lossy (quantized once, cached), "
                             f"{plan.expert_bytes / 2**20:.2f} MiB each")
    for label, value in _tier_rows(plan):
        t.add_row(label, value)
    t.add_row("experts per layer", _budgets(plan))
    if verbose and not plan.uniform:
        t.add_row("", " ".join(str(b) for b in plan.experts_per_layer.values()))
    if verbose and plan.alternatives.get("per_layer") is not None:
        t.add_row("", f"uniform {num(plan.alternatives['uniform'])} ms/step vs per layer "
                      f"{num(plan.alternatives['per_layer'])} ms/step")
    if plan.policy != "resident":
        t.add_row("τ (refresh interval)", str(plan.tau))
        if verbose:
            what = "streamed reads" if plan.misses == "stream" else "I/O + CPU"
            costs = ", ".join(num(c) for c in plan.tau_costs_ms)
            t.add_row("", f"{what} ms per block for τ = 1, 2, …: {costs}")
        if plan.misses == "stream":
            t.add_row("misses", "streamed: the GPU reads missed experts from pinned RAM inside "
                                "the step (no CPU work)")
        else:
            t.add_row("misses", f"{plan.misses}, CPU threads {plan.cpu_threads} "
                                f"({plan.cpu_mode}, {plan.cpu_dtype})")
    t.add_row("decoding", f"block {plan.block_length}, {plan.steps_per_block} steps/block, "
                          f"{plan.tokens_per_step:.2f} tokens/step")
    if verbose:
        t.add_row("routing", f"{plan.routing_source}: ~"
                  f"{sum(plan.distinct_experts) / max(1, len(plan.distinct_experts)):.0f} "
                  f"experts per layer per step, drift d ≈ "
                  f"{sum(plan.drift) / max(1, len(plan.drift)):.4f}")
    t.add_row("predicted step", _predicted(plan))
    for label, value in _breakdown_rows(plan):
        t.add_row(label, value)
    return t


def compare_table(plans: list[tuple[str, Plan]]) -> Table:
    """Several plans side by side (one column each: a profile, a VRAM budget)."""
    first = plans[0][1]
    t = Table(title=f"tide plan · {escape(first.model)}", title_justify="left",
              header_style="bold")
    t.add_column("", no_wrap=True)
    for label, _plan in plans:  # the profile over the budget: narrow columns
        t.add_column(escape(label).replace(" · ", "\n"), justify="right")
    ps = [p for _label, p in plans]

    def row(name: str, values: list[str]) -> None:
        t.add_row(name, *values)

    row("GPU", [escape(p.profile.removesuffix(" (reference)")) for p in ps])
    row("VRAM budget", [size(p.vram_budget_bytes) for p in ps])
    row("policy", [p.policy for p in ps])
    row("experts per layer", [_budgets(p).split(" of ")[0] + f"/{p.num_experts}"
                              if p.uniform else _budgets(p).split(" (")[0] for p in ps])
    if any(p.policy != "resident" for p in ps):
        row("τ", ["—" if p.policy == "resident" else str(p.tau) for p in ps])
        row("misses", ["—" if p.policy == "resident" else p.misses for p in ps])
        row("hit rate", [f"{p.breakdown.hit_rate * 100:.1f}%" for p in ps])
    if any(p.tiered for p in ps):
        row("experts on disk", [str(p.tiers()["disk"]["experts"]) for p in ps])
    row("step", [f"{num(p.predicted_step_ms)} ms" for p in ps])
    row("steps/s", [num(p.steps_per_s) for p in ps])
    row("tokens/s", [f"[bold]{num(p.tokens_per_s)}[/bold]" for p in ps])
    return t


def calibration_table(report: CalibrationReport) -> Table:
    info = report.to_dict()
    m = info["measured"]
    before, trace, after = (info["predicted_profile_only"], info["predicted_with_trace"],
                            info["predicted_calibrated"])
    t = Table(title=f"calibration on {escape(m['device'])} ({m['steps']} steps measured)",
              title_justify="left")
    for col in ("ms per step", "profile only", "+ real routing", "calibrated", "measured"):
        t.add_column(col, justify="right" if col != "ms per step" else "left")

    def row(name: str, key: str, measured: float | None) -> None:
        t.add_row(name, f"{before[key]:.2f}", f"{trace[key]:.2f}", f"{after[key]:.2f}",
                  "—" if measured is None else f"{measured:.2f}")

    streamed = report.streamed
    row("step", "step_ms", m["step_ms"])
    row("CPU misses", "cpu_miss_ms", m["cpu_ms"])
    if streamed:  # read inside the step: counted, not timed
        row("PCIe reads", "pcie_ms", None)
        row("experts read / step", "promotions_per_step", m.get("reads_per_step"))
    else:
        row("PCIe copies", "pcie_ms", m["copy_ms"])
        row("stall", "stall_ms", m["stall_ms"])
    t.add_row("hit rate", f"{before['hit_rate']:.3f}", f"{trace['hit_rate']:.3f}",
              f"{after['hit_rate']:.3f}", f"{m['hit_rate']:.3f}")
    s = info["scales"]
    launch = s.get("launch_ms_per_layer")
    t.caption = (f"fitted: fixed cost {launch:.3f} ms/layer, GPU bandwidth ×{s['gpu_scale']:.2f}, "
                 f"CPU ×{s['cpu_scale']:.2f}, PCIe ×{s['io_scale']:.2f} "
                 f"(measured plan: τ {info['measured_plan']['tau']})" if launch is not None else
                 f"fitted: CPU ×{s['cpu_scale']:.2f}, PCIe ×{s['io_scale']:.2f}")
    if streamed:
        t.caption += "; streamed reads are counted, not timed: the profile's copy time stands"
    if info.get("saved_to"):
        t.caption += f"\nsaved for this machine and model: {escape(info['saved_to'])}"
    return t


def render_plan(plan: Plan, *, console: Console | None = None, verbose: bool = False) -> None:
    out = console or err
    if plan.calibration:
        out.print(calibration_table(plan.calibration))
    out.print(plan_table(plan, verbose=verbose))
    for w in plan.warnings:
        out.print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True)
    for n in plan.notes:
        out.print(f"[dim]note: {escape(n)}[/dim]", soft_wrap=True)


def render_plans(plans: list[tuple[str, Plan]], *, console: Console | None = None,
                 verbose: bool = False) -> None:
    """Several plans in one table; their warnings (and with `verbose` their notes) after it,
    each once, naming the plans it concerns when not all."""
    out = console or err
    out.print(compare_table(plans))
    for kind, style in (("warnings", "yellow"), ("notes", "dim")):
        if kind == "notes" and not verbose:
            continue
        seen: dict[str, list[str]] = {}
        for label, plan in plans:
            for text in getattr(plan, kind):
                seen.setdefault(text, []).append(label)
        for text, labels in seen.items():
            where = "" if len(labels) == len(plans) else f" ({', '.join(labels)})"
            word = "warning" if kind == "warnings" else "note"
            out.print(f"[{style}]{word}:[/{style}] {escape(text + where)}", soft_wrap=True)
    if not verbose and any(p.notes for _label, p in plans):
        out.print("[dim]notes on the assumptions: --verbose[/dim]")
