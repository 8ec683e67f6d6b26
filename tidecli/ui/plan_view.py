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


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _budgets(plan: Plan) -> str:
    bs = list(plan.experts_per_layer.values())
    if not bs:
        return "no MoE layers"
    if plan.uniform:
        return f"{bs[0]} × {len(bs)} layers (uniform)"
    return (f"per layer {min(bs)}–{max(bs)}, mean {sum(bs) / len(bs):.1f}: "
            + " ".join(str(b) for b in bs))


def _tier_rows(plan: Plan) -> list[tuple[str, str]]:
    """Where the routed experts live: GPU slots, host RAM (+ staging ring), disk."""
    tiers = plan.tiers()
    gpu, ram, disk = tiers["gpu"], tiers["ram"], tiers["disk"]
    rows = [("tier 1: GPU", f"{gpu['experts']} expert slots, {_gib(gpu['bytes'])}")]
    if not plan.tiered:
        rows.append(("tier 2: RAM", f"all {ram['experts']} experts, {_gib(ram['bytes'])} pinned"
                     + (f" (of {_gib(ram['budget_bytes'])} for experts)"
                        if ram["budget_bytes"] else "")))
        return rows
    per = list(plan.experts_in_ram.values())
    spread = f"{per[0]}" if len(set(per)) == 1 else f"{min(per)}–{max(per)}"
    rows.append(("tier 2: RAM", f"{ram['experts']} experts ({spread} per layer), "
                 f"{_gib(ram['bytes'])} pinned + staging ring {ram['staging_experts']} × "
                 f"{plan.expert_bytes / 2**20:.1f} MiB (budget {_gib(ram['budget_bytes'])})"))
    rows.append(("tier 3: disk", f"{disk['experts']} experts, {_gib(disk['bytes'])}, read when "
                 f"missed at {disk['read_gbps']:g} GB/s"))
    return rows


def plan_table(plan: Plan) -> Table:
    bd = plan.breakdown
    t = Table(title=f"tide plan · {escape(plan.model)} on {escape(plan.profile)}",
              show_header=False,
              title_justify="left", pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("VRAM budget", f"{_gib(plan.vram_budget_bytes)}: dense {_gib(plan.dense_bytes)} + "
              f"KV {_gib(plan.kv_cache_bytes)} ({plan.context_tokens} tokens) + workspace "
              f"{_gib(plan.workspace_bytes)} + expert slots {_gib(plan.slot_bytes)} "
              f"(used {_gib(plan.used_bytes)})")
    t.add_row("policy", plan.policy)
    if plan.experts_format != "bf16":
        t.add_row("experts", f"{plan.experts_format}: lossy (quantized once, cached), "
                             f"{plan.expert_bytes / 2**20:.2f} MiB each")
    for label, value in _tier_rows(plan):
        t.add_row(label, value)
    t.add_row("experts per layer", _budgets(plan))
    if plan.alternatives.get("per_layer") is not None:
        t.add_row("", f"uniform {plan.alternatives['uniform']:.2f} ms/step vs per layer "
                      f"{plan.alternatives['per_layer']:.2f} ms/step")
    costs = ", ".join(f"{c:.1f}" for c in plan.tau_costs_ms[:12])
    more = " …" if len(plan.tau_costs_ms) > 12 else ""
    what = "streamed reads" if plan.misses == "stream" else "I/O + CPU"
    t.add_row("τ (refresh interval)", f"{plan.tau}   ({what} ms per block for τ = 1, 2, …: "
                                      f"{costs}{more})")
    if plan.misses == "stream":
        t.add_row("misses", "streamed: the GPU reads missed experts from pinned RAM inside the "
                            "step and keeps them on refresh steps (no CPU work)")
    else:
        t.add_row("CPU threads", f"{plan.cpu_threads} ({plan.cpu_mode})")
    t.add_row("decoding", f"block {plan.block_length}, {plan.steps_per_block} steps/block, "
                          f"{plan.tokens_per_step:.2f} tokens/step")
    t.add_row("routing", f"{plan.routing_source}: ~"
              f"{sum(plan.distinct_experts) / max(1, len(plan.distinct_experts)):.0f} experts "
              f"per layer per step, drift d ≈ "
              f"{sum(plan.drift) / max(1, len(plan.drift)):.4f}")
    t.add_row("predicted step", f"[bold]{plan.predicted_step_ms:.2f} ms[/bold] · "
              f"{plan.steps_per_s:.2f} steps/s · [bold]{plan.tokens_per_s:.2f} tokens/s[/bold]")
    t.add_row("  GPU dense", f"{bd.gpu_dense_ms:.2f} ms")
    t.add_row("  GPU experts", f"{bd.gpu_expert_ms:.2f} ms (hit rate {bd.hit_rate * 100:.1f}%)")
    if plan.misses == "stream":
        t.add_row("  PCIe misses", f"{bd.pcie_ms:.2f} ms (read by the GPU, "
                                   f"{bd.promotions_per_step:.1f} experts/step kept)")
    else:
        t.add_row("  CPU misses", f"{bd.cpu_miss_ms:.2f} ms, of which the GPU waits "
                                  f"{bd.cpu_stall_ms:.2f} ms")
        t.add_row("  PCIe promotions", f"{bd.pcie_ms:.2f} ms ({bd.promotions_per_step:.1f} "
                                       f"experts/step), stall {bd.pcie_stall_ms:.2f} ms")
    if plan.tiered:
        t.add_row("  disk reads", f"{bd.disk_ms:.2f} ms ({bd.disk_reads_per_step:.1f} experts"
                                  f"/step), stall {bd.disk_stall_ms:.2f} ms beyond the CPU's")
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


def render_plan(plan: Plan, *, console: Console | None = None) -> None:
    out = console or err
    if plan.calibration:
        out.print(calibration_table(plan.calibration))
    out.print(plan_table(plan))
    for w in plan.warnings:
        out.print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True)
    for n in plan.notes:
        out.print(f"[dim]note: {escape(n)}[/dim]", soft_wrap=True)
