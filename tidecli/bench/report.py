"""Bench results as JSON (atomic) and an optional matplotlib plot (the tables: ui/bench_view.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tidecli.errors import TideError
from tidecli.fsutil import atomic_write_bytes, atomic_write_text


def write_json(report: dict, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise TideError("--plot needs matplotlib",
                        "pip install 'tide-dllm[plot]' (or matplotlib), or drop --plot") from exc


def write_plot(report: dict, path: str | Path) -> Path:
    """steps/s against the VRAM budget, one line per policy (and τ), one panel per workload."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if not r.get("skipped")]
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    fig, axes = plt.subplots(1, max(1, len(workloads)), figsize=(5.5 * max(1, len(workloads)), 4),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=False):
        rows = [r for r in runs if r["workload"] == w]
        by_vram = any(r["vram_gib"] is not None for r in rows)

        def x_of(r: dict, by_vram: bool = by_vram) -> float | None:
            if by_vram:
                return r["vram_gib"]
            b = r.get("experts_per_layer") or {}
            return None if r["policy"] == "resident" else float(min(b.values(), default=0))

        lines: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            x = x_of(r)
            if x is None:
                continue
            name = r["policy"] + (f" τ={r['tau']}" if r["tau"] is not None else "") + \
                (f" ({r['misses']})" if r.get("misses") not in (None, "auto") else "") + \
                (" +ahead" if r.get("prefetch") == "layer" else "") + \
                (f" {r['guess_accuracy']:.0%}" if r.get("guess_accuracy") is not None else "")
            lines.setdefault(name, []).append((x, r["steps_per_s"]))
        for name, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for r in rows:
            if r["policy"] == "resident":
                ax.axhline(r["steps_per_s"], color="grey", linestyle="--",
                           label="resident (all experts on GPU)")
        ax.set_title(f"{w} routing" + (" (synthetic)" if w != "model" else ""))
        ax.set_xlabel("VRAM budget (GiB)" if by_vram else "experts per layer on the GPU")
        ax.set_ylabel("denoising steps / s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
