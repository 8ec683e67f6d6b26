"""Bench results: the ratios between runs, JSON (atomic) and an optional matplotlib plot (the
tables: ui/bench_view.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tidecli.bench.spec import BASELINES
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
                {"layer": " +ahead", "step": " +step"}.get(r.get("prefetch"), "") + \
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


def add_ratios(runs: list[dict]) -> None:
    """vs_best_baseline: steps/s over the best of lru and static at the same workload and budget;
    vs_resident: over resident on the same workload; on a compiled run,
    eager_over_compiled_step: the same run's eager time per denoising step over its own."""
    ok = [r for r in runs if not r.get("skipped")]
    for r in ok:
        like = [b for b in ok if b["workload"] == r["workload"]
                and b.get("experts_dtype") == r.get("experts_dtype")
                and b.get("compiled") == r.get("compiled")]
        base = [b["steps_per_s"] for b in like if b["policy"] in BASELINES
                and b["budget"] == r["budget"]]
        res = [b["steps_per_s"] for b in like if b["policy"] == "resident"]
        r["vs_best_baseline"] = round(r["steps_per_s"] / max(base), 3) if base and max(base) \
            else None
        r["vs_resident"] = round(r["steps_per_s"] / res[0], 3) if res and res[0] else None
        if r.get("compiled"):  # compiled steps decode their own way: compare time per step
            same = ("workload", "policy", "budget", "tau", "misses", "prefetch", "experts_dtype")
            eager = [b for b in ok if not b.get("compiled")
                     and all(b.get(f) == r.get(f) for f in same)]
            ms = r.get("denoise_step_ms")
            r["eager_over_compiled_step"] = round(eager[0]["denoise_step_ms"] / ms, 3) \
                if eager and ms and eager[0].get("denoise_step_ms") else None
