"""A bench's tide runs against what was possible on their own routing: the oracle's copies and
hit rate over the run's forwards in order (bench/oracle.py), and a lower bound on the step (the
GPU reading the step's active weights, or PCIe moving the oracle's copies, whichever is longer).
"""

from __future__ import annotations

import numpy as np

from tidecli.bench.oracle import best_hit_rate, oracle_loads


def trace_key(workload: str, compiled: bool) -> str:
    """A workload's routing trace, per way of running the step: compiled logits round
    differently, so the same prompts decode (and route) their own way."""
    return workload + (", compiled" if compiled else "")


def bound_rows(engine, profile, traces: dict, repeat: int, runs: list[dict]) -> list[dict]:
    """One row per tide run: `traces` the bench's routing traces by `trace_key`, `repeat` the
    passes over the prompts a run made."""
    from tidecli.bench.quality import stored_expert_bytes

    cfg = engine.cfg
    out = []
    for r in runs:
        if r.get("skipped") or r["policy"] != "tide":
            continue
        # the bytes a copy moves are the stored ones, whatever the device computes in
        fmt = r.get("experts_dtype", "bf16")
        ebytes = stored_expert_bytes(engine, fmt)
        tr = traces[trace_key(r["workload"], bool(r.get("compiled")))]
        budgets = [r["experts_per_layer"][str(layer)] for layer in cfg.moe_layers]
        # every forward of the run in order (prompts × repeats), from an empty GPU
        seq = np.concatenate(tr["forwards"] * repeat)
        loads = oracle_loads(seq, budgets)
        oracle_gb = loads * ebytes / 1e9
        row = {"workload": r["workload"], "budget": r["budget"], "tau": r["tau"],
               "misses": r["misses"],
               "oracle_h2d_gb": round(oracle_gb, 4), "tide_h2d_gb": r["h2d_gb"],
               "tide_over_oracle": round(r["h2d_gb"] / oracle_gb, 3) if oracle_gb else None,
               "best_hit_rate": round(best_hit_rate(seq, budgets), 4),
               "tide_hit_rate": r["hit_rate"],
               **({"experts_dtype": fmt} if "experts_dtype" in r else {}),
               **({"compiled": True} if r.get("compiled") else {})}
        bound = step_bound(engine, profile, tr, oracle_gb / repeat, fmt)
        if bound is not None:
            row.update(bound)
            step = r.get("denoise_step_ms") or r["step_ms"]  # a denoising step alone
            if step:
                row["tide_step_ms"] = step
                row["tide_over_bound"] = round(step / row["lower_bound_ms"], 3)
        out.append(row)
    return out


def step_bound(engine, profile, tr: dict, oracle_gb: float, fmt: str = "bf16") -> dict | None:
    """max(GPU time to read the step's active weights, PCIe time of the oracle's copies)."""
    from tidecli.bench.quality import stored_expert_bytes
    from tidecli.memory import device_dense_bytes

    p = profile
    if p is None or not getattr(p, "gpu_mem_gbps", None):
        return None
    cfg = engine.cfg
    steps = sum(c.shape[0] for c in tr["steps"])
    if not steps:
        return None
    distinct = float(np.mean([(c > 0).sum(-1).sum(-1).mean() for c in tr["steps"]]))
    eb = stored_expert_bytes(engine, fmt) if fmt != "bf16" else \
        cfg.expert_bytes(engine.dtype.itemsize)
    active = device_dense_bytes(cfg, engine.dtype.itemsize) + distinct * eb
    gpu_ms = active / (p.gpu_mem_gbps * 1e9) * 1e3
    h2d = p.h2d_pinned_expert_gbps or p.h2d_pinned_gbps
    pcie_ms = oracle_gb / steps / h2d * 1e3 if h2d else 0.0
    return {"gpu_weights_ms": round(gpu_ms, 3), "pcie_ms": round(pcie_ms, 3),
            "lower_bound_ms": round(max(gpu_ms, pcie_ms), 3)}
