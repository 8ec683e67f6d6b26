"""One MoE layer's GPU expert time as `tide profile` measures it, captured in a CUDA graph and
not, for bf16 and each compressed format, on LLaDA2.0-mini's expert shape (2048 × 512, 64
experts in the pool, top-8). Writes both tables to OUT.json and, with --profile IN --write OUT,
a copy of the profile IN whose expert times are the captured ones (what a `tide profile` run of
this tree would record), so a bench can plan with them.

    PYTHONPATH=. python3 tools/bench/expert_time_probe.py OUT.json [--profile profiles/h200.json
        --write OUT_PROFILE.json]
"""

from __future__ import annotations

import json
import sys

import torch

from tidecli.experts.formats import COMPRESSED
from tidecli.experts.qkernel import qkernel_available
from tidecli.hardware.gpu_measure import gpu_expert_ms
from tidecli.hardware.measure import DEFAULT_EXPERT_SHAPE
from tidecli.hardware.profile import load_profile_file
from tidecli.hardware.timing import TOKENS

H, INTER = DEFAULT_EXPERT_SHAPE  # mini's expert, as `tide profile` measures it


def main() -> None:
    out = sys.argv[1]
    dev = torch.device("cuda")
    found: dict[str, dict] = {}
    for fmt in ("bf16", *COMPRESSED):
        if fmt != "bf16" and not qkernel_available(dev, torch.bfloat16, fmt):
            continue
        row = {}
        for captured in (False, True):
            ms, kernel, was = gpu_expert_ms(H, INTER, device=dev, tokens=TOKENS, pool_experts=64,
                                            top_k=8, warmup=3, repeats=20, fmt=fmt,
                                            captured=captured)
            row["captured" if captured else "uncaptured"] = {str(t): round(v * 1e3, 3)
                                                             for t, v in ms.items()}
            row["kernel"], row[f"timed_captured_{captured}"] = kernel, was
            if captured:
                row["ms"] = ms
        print(fmt, {k: v for k, v in row.items() if k != "ms"}, "(µs per expert)", flush=True)
        found[fmt] = row
    with open(out, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "shape": [H, INTER],
                   "us_per_expert": {f: {k: v for k, v in r.items() if k != "ms"}
                                     for f, r in found.items()}}, fh, indent=1)
    if "--profile" in sys.argv:
        src = load_profile_file(sys.argv[sys.argv.index("--profile") + 1])
        raw = src.to_dict()
        raw["gpu_expert_ms"] = found["bf16"]["ms"]
        raw["gpu_expert_captured"] = bool(found["bf16"]["timed_captured_True"])
        raw["gpu_expert_format_ms"] = {f: r["ms"] for f, r in found.items() if f != "bf16"}
        dst = sys.argv[sys.argv.index("--write") + 1]
        with open(dst, "w") as fh:
            json.dump(raw, fh, indent=1)
        print("wrote", dst)


if __name__ == "__main__":
    main()
