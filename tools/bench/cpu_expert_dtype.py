"""One routed expert on the CPU in fp32 and in bf16, at mini's and flash's shapes.

What `--dtype auto` rests on: on a CPU with bf16 units (AVX-512 BF16, AMX) an expert of a real
model runs faster in bf16. Times experts/compute.expert_mlp (the function the runtime calls) with
torch's current thread count, the median of REPEATS calls after WARMUP, per dtype, shape and
token count. Each call reads its own copy of the weights (COPIES of them), so the weights come
from RAM as in a run, not from the cache.

    PYTHONPATH=. python tools/bench/cpu_expert_dtype.py [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from tidecli.experts.compute import expert_mlp
from tidecli.hardware.probe import cpu_computes_bf16, probe_cpu

SHAPES = {"mini": (2048, 512), "flash": (4096, 1024)}  # hidden, moe_intermediate_size
TOKENS = (8, 32, 256)
WARMUP, REPEATS, COPIES = 3, 15, 8


def time_expert(hidden: int, inter: int, tokens: int, dtype: torch.dtype) -> float:
    """Median ms of one expert call on `tokens` rows."""
    weights = [(torch.randn(2 * inter, hidden).to(dtype), torch.randn(hidden, inter).to(dtype))
               for _ in range(COPIES)]
    x = torch.randn(tokens, hidden).to(dtype)
    for i in range(WARMUP):
        expert_mlp(x, *weights[i % COPIES])
    times = []
    for i in range(REPEATS):
        t = time.perf_counter()
        expert_mlp(x, *weights[i % COPIES])
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = probe_cpu()
    out = {"cpu": cpu.model, "features": cpu.features, "bf16_units": cpu_computes_bf16(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "ms": {}}
    for name, (h, i) in SHAPES.items():
        for n in TOKENS:
            row = {d: round(time_expert(h, i, n, dt), 3)
                   for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
            row["fp32_over_bf16"] = round(row["fp32"] / row["bf16"], 2)
            out["ms"][f"{name} {n} tok"] = row
            print(f"{name:5s} {n:3d} tokens: fp32 {row['fp32']:7.3f} ms  bf16 {row['bf16']:7.3f} ms"
                  f"  ×{row['fp32_over_bf16']}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
