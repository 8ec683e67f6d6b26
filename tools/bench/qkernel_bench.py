"""The dequantizing grouped GEMM (experts/qkernel.py) against bf16 torch._grouped_mm on
LLaDA2.0-mini's expert shapes: time per expert at 1, 4 and 32 tokens per expert, weights in
device memory and (streamed misses) in pinned host memory; plus a sweep of tile configurations.

    PYTHONPATH=. python3 tools/bench/qkernel_bench.py OUT.json [--sweep]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from tidecli.experts import qkernel
from tidecli.experts.compute import grouped_linear, pool_views
from tidecli.experts.formats import COMPRESSED, expert_format
from tidecli.experts.gather import device_view
from tidecli.experts.quant import quantize_rows, views

H, INTER, E = 2048, 512, 64  # mini's expert; 64 experts used in a call


def mlp(xs, gu, dn, offs):
    h = grouped_linear(xs, gu, offs)
    g, u = h.chunk(2, dim=-1)
    return grouped_linear(F.silu(g) * u, dn, offs)


def case(fmt_name: str, tokens: int, *, pinned: bool, rows_bf16: torch.Tensor) -> dict:
    dev = torch.device("cuda")
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * tokens
    xs = torch.randn(E * tokens, H, device=dev).bfloat16()
    if fmt_name == "bf16":
        rows = rows_bf16
        gu, dn = pool_views(rows, H, INTER)
        nbytes = rows.numel() * 2
    else:
        fmt = expert_format(fmt_name, hidden=H, inter=INTER)
        rows = quantize_rows(rows_bf16, fmt)
        gu, dn = views(rows, fmt)
        nbytes = rows.numel()
    if pinned:
        host = rows.cpu().pin_memory()
        rows = device_view(host, dev)
        gu, dn = pool_views(rows, H, INTER) if fmt_name == "bf16" else views(rows, fmt)
    ms = do_bench(lambda: mlp(xs, gu, dn, offs), warmup=25, rep=200)
    return {"format": fmt_name, "tokens_per_expert": tokens, "pinned": pinned,
            "us_per_expert": round(ms * 1000 / E, 3),
            "weight_gbps": round(nbytes / (ms / 1000) / 1e9, 1)}


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    rows_bf16 = (torch.randn(E, 3 * H * INTER, device="cuda") * 0.02).bfloat16()
    results = []
    for pinned in (False, True) if "--sweep" not in sys.argv else ():
        for tokens in (1, 4, 32):
            for name in ("bf16", *COMPRESSED):
                r = case(name, tokens, pinned=pinned, rows_bf16=rows_bf16)
                results.append(r)
                print(r, flush=True)
    sweep = []
    if "--sweep" in sys.argv:
        configs = [(bm, bn, w, st) for bm in (16, 32, 64) for bn in (64, 128)
                   for w, st in ((4, 3), (8, 3), (4, 4))]
        for bm, bn, warps, stages in configs:
            qkernel.BM, qkernel.BN, qkernel.WARPS, qkernel.STAGES = bm, bn, warps, stages
            for pinned in (False, True):
                for tokens in (4, 32):
                    for name in COMPRESSED:
                        r = case(name, tokens, pinned=pinned, rows_bf16=rows_bf16)
                        r.update(bm=bm, bn=bn, warps=warps, stages=stages)
                        sweep.append(r)
                        print(r, flush=True)
    with open(out, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "shape": [H, INTER, E], "results": results,
                   "sweep": sweep}, fh, indent=1)


if __name__ == "__main__":
    main()
