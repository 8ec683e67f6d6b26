"""Where the GPU's compute stream sits idle in a profiler trace, and what the host and the copy
stream were doing meanwhile (the analysis behind docs/benchmarks.md, section 19).

Usage: python tools/bench/trace_gaps.py TRACE.json[.gz] [--steps N] [--min-gap-us 300] [--top 8]
TRACE is a Chrome trace written by tools/bench/step_trace.py (torch.profiler). The compute
stream is the GPU stream with the most kernels and copies; the copy stream the one with the most
host-to-device copies besides it. Printed as JSON: each stream's busy time, the compute stream's
gaps longer than --min-gap-us and the part of them the copy stream was busy, the host's blocking
stream syncs by what preceded them, and the longest gaps with the host calls spanning them.
Per step where --steps is given. With --kernels N, each GPU stream's busy time split by kernel
name, its N largest (what one step's kernels cost, and on which stream); with --alone NAME,
how long kernels so named ran with nothing else on the GPU, and each other kernel's median
duration beside them against without them; with --forwards LAST, each forward pass's span,
kernels and (with --alone) time in those kernels. No torch needed.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "cuda_runtime", "user_annotation")


def load(path: str | Path) -> list[dict]:
    """The trace's complete events; one line and exit 1 when it cannot be read as a trace."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt") as f:
            events = json.load(f)["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {p} is not a readable Chrome trace ({type(e).__name__}: {e}); "
                         "write one with tools/bench/step_trace.py") from None
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]


def _end(e: dict) -> float:
    return e["ts"] + e["dur"]


def _overlap(spans: list[tuple[float, float]], events: list[dict]) -> float:
    """µs of `events` (sorted by start) inside the disjoint `spans`."""
    total = 0.0
    for s, t in spans:
        for e in events:
            if e["ts"] >= t:
                break
            a, b = max(s, e["ts"]), min(t, _end(e))
            if b > a:
                total += b - a
    return total


def analyse(events: list[dict], *, min_gap_us: float = 300.0, top: int = 8) -> dict:
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    by_stream: dict[tuple, list[dict]] = {}
    for e in gpu:
        by_stream.setdefault((e["pid"], e["tid"]), []).append(e)
    if not by_stream:
        raise SystemExit("no GPU events in this trace (was it recorded with CUDA activity?)")
    compute_key = max(by_stream, key=lambda k: len(by_stream[k]))
    h2d = {k: sum(1 for e in v if "HtoD" in e["name"]) for k, v in by_stream.items()
           if k != compute_key}
    copy_key = max(h2d, key=h2d.get) if h2d and max(h2d.values()) > 0 else None
    compute = sorted(by_stream[compute_key], key=lambda e: e["ts"])
    copy = sorted(by_stream[copy_key], key=lambda e: e["ts"]) if copy_key else []
    gaps = [(_end(a), b["ts"], a["name"], b["name"])
            for a, b in zip(compute, compute[1:], strict=False) if b["ts"] - _end(a) > min_gap_us]
    spans = [(s, t) for s, t, _, _ in gaps]
    host = sorted((e for e in events if e.get("cat") in HOST_CATS), key=lambda e: e["ts"])
    host_tid = Counter((e["pid"], e["tid"]) for e in host).most_common(1)
    main = [e for e in host if host_tid and (e["pid"], e["tid"]) == host_tid[0][0]]
    syncs: Counter = Counter()
    sync_us: Counter = Counter()
    for i, e in enumerate(main):
        if e["name"] != "cudaStreamSynchronize":
            continue
        ops = []  # the host ops just before it, back to the previous sync
        for x in reversed(main[max(0, i - 8): i]):
            if x["name"] == "cudaStreamSynchronize":
                break
            ops.append(x["name"])
        key = "after a host tensor made by torch.tensor (aten::lift_fresh)" \
            if "aten::lift_fresh" in ops else "other"
        syncs[key] += 1
        sync_us[key] += e["dur"]
    longest = []
    for s, t, before, after in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        spanning = [e for e in main if e["ts"] < t and _end(e) > s and e["dur"] > 0.3 * (t - s)]
        spanning.sort(key=lambda e: -e["dur"])
        longest.append({"gap_ms": round((t - s) / 1000, 3), "after": before[:60],
                        "before": after[:60],
                        "host": [f"{e['name'][:50]} {e['dur'] / 1000:.2f} ms"
                                 for e in spanning[:4]]})
    ms = lambda us: round(us / 1000, 3)  # noqa: E731
    return {
        "span_ms": ms(_end(compute[-1]) - compute[0]["ts"]),
        "compute_busy_ms": ms(sum(e["dur"] for e in compute)),
        "copy_busy_ms": ms(sum(e["dur"] for e in copy)),
        "gaps": len(gaps),
        "gap_ms": ms(sum(t - s for s, t in spans)),
        "gap_with_copy_busy_ms": ms(_overlap(spans, copy)),
        "stream_syncs": {k: {"count": syncs[k], "ms": ms(sync_us[k])} for k in syncs},
        "longest_gaps": longest,
    }


def kernels(events: list[dict], top: int, steps: int = 0) -> list[dict]:
    """Every GPU stream together ("all": a captured graph's kernels run on streams of the
    driver's choosing), then each stream (most events first): its summed kernel ms and its
    `top` kernel names by total ms, per step where `steps` > 0."""
    by_stream: dict[tuple, Counter] = {("", "all"): Counter()}
    calls: dict[tuple, Counter] = {("", "all"): Counter()}
    for e in events:
        if e.get("cat") in GPU_CATS:
            for k in ((e["pid"], e["tid"]), ("", "all")):
                by_stream.setdefault(k, Counter())[e["name"][:70]] += e["dur"]
                calls.setdefault(k, Counter())[e["name"][:70]] += 1
    div = 1000.0 * max(1, steps)
    out = []
    for k in sorted(by_stream, key=lambda k: -sum(calls[k].values())):
        c = by_stream[k]
        out.append({"stream": str(k[1]), "busy_ms": round(sum(c.values()) / div, 3),
                    "events": round(sum(calls[k].values()) / max(1, steps), 1),
                    "top": [f"{v / div:.3f} ms  x{calls[k][n] / max(1, steps):.1f}  {n}"
                            for n, v in c.most_common(top)]})
    return out


def _union_us(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def alone(events: list[dict], name: str, steps: int = 0) -> dict:
    """How long the GPU ran anything, anything but kernels whose name starts with `name`, and
    those kernels with nothing else running (the time they held the step up, or ran in a
    gap), over every stream; per step where `steps` > 0."""
    gpu = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in GPU_CATS]
    busy = _union_us([(a, b) for a, b, _ in gpu])
    others = _union_us([(a, b) for a, b, n in gpu if not n.startswith(name)])
    div = 1000.0 * max(1, steps)
    return {"name": name, "busy_ms": round(busy / div, 3), "others_busy_ms": round(others / div, 3),
            "alone_ms": round((busy - others) / div, 3)}


def beside(events: list[dict], name: str, top: int, steps: int = 0, min_calls: int = 20,
           min_us: float = 5.0) -> dict:
    """Each other kernel's median duration when it ran with no kernel named `name...` of at
    least `min_us` running (a gather that moved rows, say) and when it overlapped one, and what
    its calls beside them took over its own median ("extra", summed); the `top` largest
    extras, per step where `steps` > 0. Kernels with fewer than `min_calls` calls either way
    are left out (their medians say little). Calls of different sizes under one name (a grouped
    GEMM's passes) make its line compare sizes, not neighbours."""
    import bisect

    kern = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    marks = [(e["ts"], _end(e)) for e in kern
             if e["name"].startswith(name) and e["dur"] >= min_us]
    starts = [a for a, _ in marks]
    longest = max((b - a for a, b in marks), default=0.0)

    def overlaps(e: dict) -> bool:
        i = bisect.bisect_left(starts, _end(e))
        j = bisect.bisect_left(starts, e["ts"] - longest)
        return any(b > e["ts"] for _, b in marks[j:i])

    by: dict[str, tuple[list, list]] = {}
    for e in kern:
        if not e["name"].startswith(name):
            by.setdefault(e["name"][:70], ([], []))[overlaps(e)].append(e["dur"])
    div = 1000.0 * max(1, steps)
    rows = []
    for n, (alone_d, near) in by.items():
        if len(alone_d) < min_calls or len(near) < min_calls:
            continue
        med_a = sorted(alone_d)[len(alone_d) // 2]
        med_b = sorted(near)[len(near) // 2]
        rows.append((sum(near) - med_a * len(near), n, med_a, med_b, len(near)))
    rows.sort(reverse=True)
    return {"name": name, "extra_ms": round(sum(r[0] for r in rows) / div, 3),
            "top": [f"{x / div:.3f} ms  median {a:.1f} -> {b:.1f} us  x{c / max(1, steps):.1f}  {n}"
                    for x, n, a, b, c in rows[:top]]}


def forwards(events: list[dict], last: str, named: str | None = None) -> list[dict]:
    """The GPU timeline cut after each kernel whose name starts with `last` (the lm_head's,
    which ends a forward pass): per forward its span, its kernel count, and the summed ms of
    kernels named `named...` in it (the gathers, say)."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    out, cur = [], []
    for e in gpu:
        cur.append(e)
        if e["name"].startswith(last):
            row = {"span_ms": round((_end(e) - cur[0]["ts"]) / 1000, 3), "kernels": len(cur)}
            if named:
                row[named] = round(sum(x["dur"] for x in cur
                                       if x["name"].startswith(named)) / 1000, 3)
            out.append(row)
            cur = []
    return out


def per_step(report: dict, steps: int) -> dict:
    keys = ("span_ms", "compute_busy_ms", "copy_busy_ms", "gap_ms", "gap_with_copy_busy_ms")
    return {k: round(report[k] / steps, 3) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=0, help="denoising steps in the trace")
    ap.add_argument("--min-gap-us", type=float, default=300.0)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--kernels", type=int, default=0, help="each stream's N costliest kernels")
    ap.add_argument("--alone", default=None, metavar="NAME",
                    help="the time kernels named NAME... ran with nothing else on the GPU, and "
                         "how much longer the other kernels ran beside them")
    ap.add_argument("--forwards", default=None, metavar="LAST",
                    help="per forward pass, cut after each kernel named LAST... (the lm_head's)")
    a = ap.parse_args()
    events = load(a.trace)
    report = analyse(events, min_gap_us=a.min_gap_us, top=a.top)
    if a.steps > 0:
        report["per_step"] = per_step(report, a.steps)
    if a.kernels > 0:
        report["kernels"] = kernels(events, a.kernels, a.steps)
    if a.alone:
        report["alone"] = alone(events, a.alone, a.steps)
        report["beside"] = beside(events, a.alone, a.top, a.steps)
    if a.forwards:
        report["forwards"] = forwards(events, a.forwards, a.alone)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
