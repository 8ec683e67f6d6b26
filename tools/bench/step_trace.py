"""Where a host-driven step's time goes: torch.profiler over a few denoising steps.

Usage: PYTHONPATH=. python tools/bench/step_trace.py MODEL --misses gpu --vram 10 --out DIR
       [--policy resident] [--compile on] [--experts-dtype int4]
       [--workload drifting] [--prefetch layer] [--guess-accuracy 1]
Prints the CUDA and CPU time per operator over the profiled steps, the wall time per step, and
writes a Chrome trace (DIR/trace-<policy>-<misses>[-compiled].json.gz) to read the timeline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tidecli.decode.settings import DecodeSettings
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--policy", default="tide")
    ap.add_argument("--misses", default="gpu")
    ap.add_argument("--vram", type=float, default=10.0)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--compile", default="off")
    ap.add_argument("--experts-dtype", default="bf16")
    ap.add_argument("--out", default=".")
    ap.add_argument("--workload", default="model", choices=("model", "synthetic", "drifting"))
    ap.add_argument("--prefetch", default="off")
    ap.add_argument("--guess-accuracy", type=float, default=None)
    a = ap.parse_args()
    resident = a.policy == "resident"
    eng = Engine(engine_options(model=a.model, policy=a.policy, misses=a.misses,
                                vram_gib=None if resident else a.vram,
                                profile=a.profile, tau=None if resident else 1,
                                compile=a.compile, experts_dtype=a.experts_dtype,
                                prefetch=a.prefetch),
                 quiet=True)
    if a.workload != "model":  # the bench's synthetic routing, its read-ahead guess set
        from tidecli.bench.synthetic import DriftingRouting, SyntheticRouting

        cls = {"synthetic": SyntheticRouting, "drifting": DriftingRouting}[a.workload]
        router = cls(eng.cfg, device=eng.device, block_length=eng.opts.workload.block_length)
        router.guess_accuracy = a.guess_accuracy
        router.prepare(blocks=4, steps=eng.opts.workload.block_length)  # not drawn in the steps
        eng.set_router(router)
    ids = eng.prompt_ids("Explain why the sky is blue to a ten-year-old.")
    for _ in eng.decoder(ids, DecodeSettings(gen_length=64)).steps():
        pass
    torch.cuda.synchronize()
    steps = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for ev in eng.decoder(ids, DecodeSettings(gen_length=a.gen_length)).steps():
            steps.append(ev.forward_ms)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    print(json.dumps({"misses": eng.runtime.describe().misses, "steps": len(steps),
                      "wall_ms_per_step": round(wall * 1e3 / max(1, len(steps)), 3),
                      "forward_ms": [round(x, 2) for x in steps]}))
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    out = Path(a.out)
    name = f"{a.policy}-{a.misses}" + ("-compiled" if a.compile == "on" else "")
    if a.experts_dtype != "bf16":
        name += f"-{a.experts_dtype}-{a.vram:g}"
    if a.workload != "model":
        name += f"-{a.workload}"
    if a.prefetch != "off":
        name += f"-ahead{'' if a.guess_accuracy is None else f'{a.guess_accuracy:g}'}"
    raw = out / f"trace-{name}.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    eng.close()


if __name__ == "__main__":
    main()
