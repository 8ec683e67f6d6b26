"""Rendering for `tide profile`: the measuring progress bar, the profile table, the reference list.

Achieved figures are shown next to their peak (PCIe link, spec memory bandwidth) where one is
known; numbers that are not measured say so ("spec", "est.").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tidecli.hardware.profile import HardwareProfile
from tidecli.ui.console import err

out = Console(highlight=False)  # results (the reference list) go to stdout


@contextlib.contextmanager
def measure_progress(*, enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield progress(stage, done, total): one bar for the whole profile, labelled by stage."""
    if not enabled or not err.is_terminal:
        yield lambda stage, done, total: None
        return
    bar = Progress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    task = bar.add_task("profiling", total=None)

    def update(stage: str, done: int, total: int) -> None:
        bar.update(task, description=stage[:44], completed=done, total=total)

    with bar:
        yield update


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _tag(profile: HardwareProfile, field: str) -> str:
    src = profile.sources.get(field)
    return {"spec": " [dim](spec)[/]", "estimated": " [dim](est.)[/]"}.get(src or "", "")


def _of_peak(value: float, peak: float | None, what: str) -> str:
    if not peak:
        return ""
    return f" · {100 * value / peak:.0f}% of {what} {peak:.1f} GB/s"


def _series(values: dict[int, float], unit: str = "tok") -> str:
    return " · ".join(f"{k} {unit}: {v:.3f}" for k, v in sorted(values.items()))


def _gpu_rows(p: HardwareProfile, add: Callable[[str, str], None]) -> None:
    vram = f"{_gib(p.vram_total_bytes)} ({_gib(p.vram_free_bytes)} free)"
    driver = f" · driver {escape(p.driver)}" if p.driver else ""
    add("GPU", f"{escape(p.gpu_name or '')} · {vram}{driver}")
    link = "unknown"
    if p.pcie_gen and p.pcie_width:
        link = f"PCIe {p.pcie_gen}.0 x{p.pcie_width}"
        if p.pcie_gen_max and p.pcie_width_max and (p.pcie_gen_max, p.pcie_width_max) != (
                p.pcie_gen, p.pcie_width):
            link += f" (max {p.pcie_gen_max}.0 x{p.pcie_width_max})"
        if p.pcie_peak_gbps:
            link += f" · peak {p.pcie_peak_gbps:.1f} GB/s per direction"
    add("link", link)
    peak, size = p.pcie_peak_gbps, p.expert_shape
    expert_mib = 3 * size[0] * size[1] * 2 / 2**20
    for label, field in (("pinned H2D, large", "h2d_pinned_gbps"),
                         (f"pinned H2D, one expert ({expert_mib:.1f} MiB)",
                          "h2d_pinned_expert_gbps"),
                         ("pageable H2D, large", "h2d_pageable_gbps"),
                         (f"pageable H2D, one expert ({expert_mib:.1f} MiB)",
                          "h2d_pageable_expert_gbps"),
                         ("pinned D2H, large", "d2h_pinned_gbps")):
        value = getattr(p, field)
        if value is not None:
            add(label, f"{value:.1f} GB/s{_of_peak(value, peak, 'link peak')}{_tag(p, field)}")
    if p.copy_latency_ms is not None:
        add("copy latency", f"{p.copy_latency_ms * 1e3:.1f} µs{_tag(p, 'copy_latency_ms')}")
    if p.gpu_mem_gbps is not None:
        add("device memory", f"{p.gpu_mem_gbps:.0f} GB/s (read + write)"
            f"{_of_peak(p.gpu_mem_gbps, p.gpu_mem_peak_gbps, 'spec')}{_tag(p, 'gpu_mem_gbps')}")
    if p.gpu_bf16_tflops is not None:
        peak_tf = (f" · {100 * p.gpu_bf16_tflops / p.gpu_bf16_peak_tflops:.0f}% of spec "
                   f"{p.gpu_bf16_peak_tflops:.1f}" if p.gpu_bf16_peak_tflops else "")
        add("bf16 GEMM", f"{p.gpu_bf16_tflops:.1f} TFLOP/s{peak_tf}{_tag(p, 'gpu_bf16_tflops')}")
    if p.gpu_expert_ms:
        kernel = f", {p.gpu_expert_kernel}" if p.gpu_expert_kernel else ""
        add(f"GPU expert, ms each{kernel}",
            _series(p.gpu_expert_ms) + _tag(p, "gpu_expert_ms"))
    for fmt, table in p.gpu_expert_format_ms.items():
        add(f"GPU expert in {fmt}, ms each", _series(table))


def _cpu_rows(p: HardwareProfile, add: Callable[[str, str], None]) -> None:
    feats = ", ".join(p.cpu_features) or "no avx2"
    add("CPU", f"{escape(p.cpu_model)} · {p.cpu_physical_cores} cores / "
        f"{p.cpu_logical_cores} threads · {feats}")
    ram = f"{_gib(p.ram_total_bytes)} ({_gib(p.ram_available_bytes)} available)"
    if p.ram_read_gbps is not None:
        ram += f" · read {p.ram_read_gbps:.1f} GB/s{_tag(p, 'ram_read_gbps')}"
    add("RAM", ram)
    if p.disk_read_gbps is not None:
        if p.disk_read_cold is False:
            disk = f"{p.disk_read_gbps:.2f} GB/s, warm only (page cache could not be dropped)"
        else:
            disk = f"{p.disk_read_gbps:.2f} GB/s cold"
            if p.disk_read_warm_gbps is not None:
                disk += f" · {p.disk_read_warm_gbps:.2f} GB/s warm (page cache)"
        add("disk read", disk + _tag(p, "disk_read_gbps"))
    if p.cpu_variant_ms:
        best = f"{p.cpu_dtype}/{p.cpu_mode}"
        add("CPU expert variants, ms each", " · ".join(
            f"[bold]{k}: {v:.3f}[/]" if k == best else f"{k}: {v:.3f}"
            for k, v in p.cpu_variant_ms.items()))
    if p.cpu_expert_ms:
        pick = 8  # the token count the CPU setup is chosen for (see hardware/measure.py)
        at_pick = {t: m[pick] for t, m in sorted(p.cpu_expert_ms.items()) if pick in m}
        if len(at_pick) > 1:
            add(f"CPU expert at {pick} tok, ms each",
                " · ".join(f"{t} thr: {ms:.3f}" for t, ms in at_pick.items()))
        for threads, curve in sorted(p.cpu_expert_ms.items()):
            if len(curve) > 1:
                add(f"CPU expert, {threads} thr, ms each",
                    _series(curve) + _tag(p, "cpu_expert_ms"))
        add("CPU pick", f"{p.cpu_best_threads} thr, {p.cpu_dtype}, mode {p.cpu_mode}"
            f"{_tag(p, 'cpu_best_threads')}")


def render_profile(profile: HardwareProfile, *, saved_to: Path | None = None) -> None:
    """The profile as a table on stderr, then its notes."""
    table = Table(title=escape(profile.name), title_justify="left", show_header=False, box=None,
                  padding=(0, 1))
    table.add_column(style="cyan", no_wrap=True)
    table.add_column()

    def add(label: str, value: str) -> None:
        table.add_row(label, value)

    if profile.gpu_name:
        _gpu_rows(profile, add)
    else:
        add("GPU", "none usable (CPU-only profile)")
    _cpu_rows(profile, add)
    if profile.host_layer_ms:
        each = " · ".join(f"{m} {ms:.3f}" for m, ms in profile.host_layer_ms.items())
        add("host hand-off",
            f"ms per MoE layer with misses: {each}{_tag(profile, 'host_layer_ms')}")
    err.print(table)
    for note in profile.notes:
        err.print(f"[dim]· {escape(note)}[/]")
    if saved_to is not None:
        err.print(f"saved to {escape(str(saved_to))}")


def render_reference_list(profiles: dict[str, HardwareProfile]) -> None:
    """name → profile, one line each on stdout."""
    table = Table(show_header=True, box=None, padding=(0, 1), header_style="bold")
    for col in ("name", "card", "PCIe", "pinned H2D", "RAM", "CPU cores"):
        table.add_column(col, no_wrap=True)
    for name, p in profiles.items():
        link = f"{p.pcie_gen}.0 x{p.pcie_width}" if p.pcie_gen and p.pcie_width else "-"
        h2d = f"{p.h2d_pinned_gbps:.1f} GB/s" if p.h2d_pinned_gbps else "-"
        isa = p.cpu_features[-1] if p.cpu_features else "-"  # the most capable one listed
        card = p.name.removesuffix(" (reference)").removesuffix(" (measured)")
        table.add_row(escape(name), escape(card), link, h2d, _ram(p),
                      f"{p.cpu_physical_cores} {isa}")
    out.print(table)
    err.print("RAM: what the profile assumes the host has; it bounds the experts kept in "
              "host memory (`tide plan --ram GiB` plans for another amount)", style="dim",
              markup=False, soft_wrap=True)


def _ram(p: HardwareProfile) -> str:
    """The host RAM a profile assumes."""
    return f"{p.ram_total_bytes / 2**30:.0f} GiB" if p.ram_total_bytes else "-"
