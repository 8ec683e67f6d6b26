"""The start-up panel (what an engine runs) and the per-layer expert table of /stats."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.panel import Panel
from rich.table import Table

from tidecli.units import size_text

if TYPE_CHECKING:
    from tidecli.runtime.engine import EngineInfo


def startup_rows(info: EngineInfo) -> list[tuple[str, str]]:
    """(label, value) rows of what an engine runs; what does not apply is left out."""
    rows: list[tuple[str, str]] = []
    rt, plan, mem = info.runtime, info.plan, info.memory
    if info.model:
        rows.append(("model", info.model))
    if info.demo:
        rows.append(("demo", "random weights, for trying the tool (-m gives a real model)"))
    threads = (f"{info.cpu_threads} thread" + ("s" if info.cpu_threads > 1 else "")) \
        if info.cpu_threads else ""
    dev = " · ".join(x for x in (info.device, info.dtype, threads) if x)
    if dev:
        rows.append(("device", dev))
    rows.append(("policy", rt.policy + (f" (kernel {rt.kernel})" if rt.kernel else "")))
    if info.compiled:
        rows.append(("step", "compiled (torch.compile; the first step compiles)"))
    if info.choice:
        rows.append(("why", info.choice))
    if rt.experts_format:  # compressed routed experts: say that they are lossy
        rows.append(("experts", f"{rt.experts_format}, lossy (quantized once, cached)"))
    epl = rt.experts_per_layer or (plan.experts_per_layer if plan else None)
    if epl:
        vals = list(epl.values())
        text = (f"{vals[0]} per MoE layer" if len(set(vals)) == 1 else
                f"{min(vals)}–{max(vals)} per layer, {sum(vals)} in all")
        rows.append(("experts resident", text))
    tau = rt.tau if rt.tau is not None else (plan.tau if plan else None)
    if tau is not None:
        rows.append(("τ", str(tau)))
    if plan and plan.profile:  # the runtime follows the planner's plan
        rows.append(("plan", f"planned for {plan.profile}" +
                     (" (calibrated on this machine)" if plan.calibrated else "")))
    if rt.prefetch == "layer":
        rows.append(("read-ahead", "each layer's guessed experts, while the layer before computes"))
    elif rt.prefetch == "step":
        rows.append(("read-ahead", "each step's guessed experts, copied before the step runs"))
    if rt.cpu_threads:
        rows.append(("CPU experts", f"{rt.cpu_threads} threads, {rt.cpu_mode or ''}".rstrip(", ")))
    if mem is not None and mem.budget:
        rows.append(("VRAM budget", f"{size_text(mem.budget)} (dense {size_text(mem.dense)}, "
                                    f"KV {size_text(mem.kv_cache)})"))
    if rt.slot_pool_bytes:
        rows.append(("slot memory", size_text(rt.slot_pool_bytes)))
    store = rt.host_store
    if store is not None and store.bytes:
        disk = store.tiers.get("disk_experts")
        rows.append(("host experts", size_text(store.bytes) + (" pinned" if store.pinned else "")
                     + (f", {disk} experts read from disk" if disk else "")))
    if plan and plan.predicted_tokens_per_s:
        sps = plan.predicted_steps_per_s
        rows.append(("predicted", f"{plan.predicted_tokens_per_s:.1f} tok/s"
                     + (f", {sps:.1f} steps/s" if sps else "")))
    return rows


def startup_panel(info: EngineInfo, title: str = "tide") -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    for label, value in startup_rows(info):
        grid.add_row(label, value)
    return Panel(grid, title=title, title_align="left", expand=False)


def heat_bar(frac: float, cells: int = 10) -> str:
    n = max(0, min(cells, round(frac * cells)))
    return "█" * n + "░" * (cells - n)


def layer_table(per_layer: dict[str, dict[str, Any]], title: str | None = None) -> Table:
    """Per-MoE-layer counters of one reply (ExpertStats.to_dict()['per_layer'])."""
    t = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for name in ("layer", "pairs", "GPU hit", "", "CPU", "promoted", "H2D MiB", "stall ms"):
        t.add_column(name, justify="left" if name in ("layer", "") else "right")
    for layer, c in sorted(per_layer.items(), key=lambda kv: int(kv[0])):
        pairs = c.get("gpu_hits", 0) + c.get("fetched_calls", 0) + c.get("cpu_calls", 0)
        hit = c.get("gpu_hits", 0) / pairs if pairs else 1.0
        cpu = c.get("cpu_calls", 0) / pairs if pairs else 0.0
        t.add_row(str(layer), str(pairs), f"{hit * 100:.1f}%", heat_bar(hit),
                  f"{cpu * 100:.1f}%", str(c.get("promotions", 0)),
                  f"{c.get('bytes_h2d', 0) / 2**20:.1f}", f"{c.get('stall_ms', 0.0):.1f}")
    return t
