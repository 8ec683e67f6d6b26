"""GPU microbenchmarks behind design choices (grouped kernels, copies, CPU experts).

Usage: PYTHONPATH=. python tools/bench/gpu_checks.py [--out DIR]
Prints a table per check and writes gpu_checks.json into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tidecli.experts.compute import pool_views, run_grouped_loop, run_grouped_mm
from tidecli.experts.cpu import CpuExperts
from tidecli.hardware.timing import median_cuda_ms, median_wall_ms


def cuda_ms(fn, reps=30, warm=5):
    return median_cuda_ms(fn, warmup=warm, repeats=reps)


def wall_ms(fn, reps=20, warm=3):
    return median_wall_ms(fn, warmup=warm, repeats=reps)


def grouped_vs_loop(h=2048, i=512, e=256, t=32, k=8, distinct=70):
    dev = torch.device("cuda")
    buf = (torch.randn(e, 3 * h * i, device=dev) * 0.02).bfloat16()
    gate_up, down = pool_views(buf, h, i)
    x = torch.randn(t, h, device=dev).bfloat16()
    used = torch.randperm(e, device=dev)[:distinct]
    slots = used[torch.randint(0, distinct, (t * k,), device=dev)]
    out = torch.empty(t * k, h, device=dev, dtype=torch.bfloat16)
    res = {}
    res["grouped_mm_ms"] = cuda_ms(lambda: run_grouped_mm(x, slots, gate_up, down, k))
    res["loop_ms"] = cuda_ms(lambda: run_grouped_loop(x, slots, gate_up, down, k, out))
    bytes_read = distinct * 3 * h * i * 2
    res["distinct_experts"] = distinct
    res["grouped_mm_gbps"] = bytes_read / res["grouped_mm_ms"] / 1e6
    return res


def copies(h=2048, i=512):
    dev = torch.device("cuda")
    n = 3 * h * i
    pinned = torch.randn(n, dtype=torch.float32).bfloat16().pin_memory()
    pageable = torch.randn(n, dtype=torch.float32).bfloat16()
    dst = torch.empty(n, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream()
    res = {}
    for name, src in (("pinned", pinned), ("pageable", pageable)):
        def go(src=src):
            with torch.cuda.stream(s):
                dst.copy_(src, non_blocking=True)
            torch.cuda.current_stream().wait_stream(s)
        ms = cuda_ms(go, reps=50)
        res[f"{name}_expert_ms"] = ms
        res[f"{name}_expert_gbps"] = n * 2 / ms / 1e6
    big = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dbig = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    ms = cuda_ms(lambda: dbig.copy_(big, non_blocking=True), reps=10)
    res["pinned_256MiB_gbps"] = (256 << 20) / ms / 1e6
    return res


def cpu_experts(h=2048, i=512):
    row = (torch.randn(3 * h * i) * 0.02).bfloat16()
    res = {}
    cores = torch.get_num_threads()
    for dtype in (torch.bfloat16, torch.float32):
        for mode in ("intra", "experts"):
            for tokens in (1, 4, 32):
                w = CpuExperts(hidden=h, inter=i, dtype=dtype, threads=cores, mode=mode)
                jobs = [(row, torch.randn(tokens, h).bfloat16()) for _ in range(8)]
                if mode == "intra":
                    torch.set_num_threads(cores)
                ms = wall_ms(lambda w=w, jobs=jobs: w.run(jobs), reps=10) / len(jobs)
                res[f"{str(dtype)[6:]}_{mode}_{tokens}tok_ms_per_expert"] = ms
                w.close()
    torch.set_num_threads(cores)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    info = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
            "threads": torch.get_num_threads()}
    out = {"info": info}
    for name, fn in (("grouped_vs_loop", grouped_vs_loop), ("copies", copies),
                     ("cpu_experts", cpu_experts)):
        t = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as exc:  # keep going: the others are still worth having
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        out[name]["seconds"] = round(time.perf_counter() - t, 2)
        print(name, json.dumps(out[name], indent=1), flush=True)
    Path(args.out, "gpu_checks.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
