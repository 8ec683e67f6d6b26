"""The dequantizing grouped GEMM (experts/qkernel.py) against bf16 torch._grouped_mm on
LLaDA2.0-mini's expert shapes: time per expert of a whole expert pass as the runtime runs it
(compute.grouped_rows: the fused kernel, `pass: fused`, and beside it the separate ops,
`pass: ops`, for bf16 experts too) at 1, 4 and 32 tokens per expert, weights in device
memory and (streamed misses) in pinned host memory, each with the tiles the runtime picks there
(`qkernel.tiles_for`); plus a sweep of tile configurations (`--sweep`), and whether
other tiles give bitwise the rows of BM 32 tiles (`--bitwise`: a policy's tokens stay the
resident run's only where the tiles it may use agree). `--sweep32 FMT` times FMT's tiles with
BM 32 (the bitwise family) at 32 tokens per expert in device memory, with bf16 beside them, and
checks each against the BM 32 / BN 128 rows. `--unpack` times int4 with its values built from
exponent bits and converted (qkernel.INT4_UNPACK), and checks that both give the same rows.
`--only FMT[,FMT]` limits the table and the sweep to those formats (bf16 among them).

    PYTHONPATH=. python3 tools/bench/qkernel_bench.py OUT.json [--sweep] [--bitwise] [--sweep32 FMT]
        [--unpack] [--only FMT,...]
"""

from __future__ import annotations

import json
import sys

import torch
from triton.testing import do_bench

from tidecli.experts import qkernel
from tidecli.experts.compute import grouped_rows, grouped_rows_ops, pool_views
from tidecli.experts.formats import COMPRESSED, expert_format
from tidecli.experts.gather import device_view
from tidecli.experts.quant import quantize_rows, views

H, INTER, E = 2048, 512, 64  # mini's expert; 64 experts used in a call


def expert_pass(xs, gu, dn, offs, streamed=False, ops=False):
    """One pass over sorted pairs (pair i = token row i), as the runtime calls it."""
    n = xs.shape[0]
    rows = torch.arange(n, device=xs.device)
    out = torch.empty((n + 1, xs.shape[1]), dtype=xs.dtype, device=xs.device)
    (grouped_rows_ops if ops else grouped_rows)(xs, rows, rows, offs, gu, dn, out,
                                                streamed=streamed)
    return out


def case(fmt_name: str, tokens: int, *, pinned: bool, rows_bf16: torch.Tensor,
         ops: bool = False) -> dict:
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
    ms = do_bench(lambda: expert_pass(xs, gu, dn, offs, pinned, ops), warmup=25, rep=200)
    return {"format": fmt_name, "tokens_per_expert": tokens, "pinned": pinned,
            "pass": "ops" if ops else "fused",
            "us_per_expert": round(ms * 1000 / E, 3),
            "weight_gbps": round(nbytes / (ms / 1000) / 1e9, 1)}


CANDIDATES = [(bm, bn, w, st) for bm in (16, 32, 64) for bn in (64, 128)
              for w, st in ((4, 3), (8, 3), (4, 4))]


WIDE = [(32, bn, w, st) for bn in (64, 128, 256) for w in (2, 4, 8) for st in (2, 3, 4, 5)]


def bitwise(rows_bf16: torch.Tensor, formats=COMPRESSED, candidates=CANDIDATES) -> list[dict]:
    """Each candidate's rows against the streamed tiles' on the same inputs: token counts per
    expert from 0 to 40 (several M tiles, partial tiles), both matrices of each format."""
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    counts = torch.tensor([3, 0, 40, 1, 0, 7, 16, 2, 0, 5, 33, 1, 64, 4])
    e = counts.numel()
    offs = torch.cumsum(counts, 0).to(torch.int32).to(dev)
    m = int(counts.sum()) + 3
    base = qkernel.LARGE
    found = []
    for name in formats:
        fmt = expert_format(name, hidden=H, inter=INTER)
        gu, dn = views(quantize_rows(rows_bf16[:e], fmt), fmt)
        for mat, k in ((gu, H), (dn, INTER)):
            x = torch.randn(m, k, device=dev, generator=g).bfloat16()
            want = qkernel.quant_grouped_mm(x, mat, offs, tiles=base)
            for c in candidates:
                got = qkernel.quant_grouped_mm(x, mat, offs, tiles=qkernel.Tiles(*c))
                diff = float((got.float() - want.float()).abs().max())
                r = {"format": name, "k": k, "tiles": list(c),
                     "equal": bool(torch.equal(got, want)), "max_abs_diff": diff}
                found.append(r)
                print(r, flush=True)
    return found


def unpack(rows_bf16: torch.Tensor) -> list[dict]:
    """int4 with each unpacking: µs per expert, and whether the rows are bitwise the same."""
    found, outs = [], {}
    dev = torch.device("cuda")
    fmt = expert_format("int4", hidden=H, inter=INTER)
    gu, dn = views(quantize_rows(rows_bf16, fmt), fmt)
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * 32
    g = torch.Generator(device="cuda").manual_seed(2)
    xs = torch.randn(E * 32, H, device=dev, generator=g).bfloat16()
    for way in ("convert", "bits", "convert", "bits"):
        qkernel.INT4_UNPACK = way
        outs[way] = expert_pass(xs, gu, dn, offs)
        for tokens in (1, 4, 32):
            r = case("int4", tokens, pinned=False, rows_bf16=rows_bf16)
            r.update(unpack=way)
            found.append(r)
            print(r, flush=True)
    same = bool(torch.equal(outs["convert"], outs["bits"]))
    print({"unpack_same_rows": same}, flush=True)
    found.append({"unpack_same_rows": same})
    qkernel.INT4_UNPACK = "bits"
    return found


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    rows_bf16 = (torch.randn(E, 3 * H * INTER, device="cuda") * 0.02).bfloat16()
    same = bitwise(rows_bf16) if "--bitwise" in sys.argv else []
    if "--unpack" in sys.argv:
        same += unpack(rows_bf16)
    results = []
    skip = "--sweep" in sys.argv or "--unpack" in sys.argv
    names = ("bf16", *COMPRESSED)
    if "--only" in sys.argv:
        names = tuple(sys.argv[sys.argv.index("--only") + 1].split(","))
    for pinned in (False, True) if not skip else ():
        for tokens in (1, 4, 32):
            for name, ops in ((f, o) for f in names for o in (False, True)):
                r = case(name, tokens, pinned=pinned, rows_bf16=rows_bf16, ops=ops)
                results.append(r)
                print(r, flush=True)
    sweep = []
    if "--sweep" in sys.argv:
        for bm, bn, warps, stages in CANDIDATES:
            tiles = qkernel.Tiles(bm, bn, warps, stages)
            qkernel.tiles_for = lambda fmt, rows, groups, streamed, t=tiles: t
            for pinned in (False, True):
                for tokens in (4, 32):
                    for name in names:
                        r = case(name, tokens, pinned=pinned, rows_bf16=rows_bf16)
                        r.update(bm=bm, bn=bn, warps=warps, stages=stages)
                        sweep.append(r)
                        print(r, flush=True)
    if "--sweep32" in sys.argv:
        at = sys.argv.index("--sweep32") + 1
        if at >= len(sys.argv) or sys.argv[at] not in COMPRESSED:
            sys.exit(f"--sweep32 needs a format: one of {', '.join(COMPRESSED)}")
        name = sys.argv[at]
        real = qkernel.tiles_for
        for r in (case("bf16", 32, pinned=False, rows_bf16=rows_bf16),
                  case(name, 32, pinned=False, rows_bf16=rows_bf16)):
            r.update(tiles="runtime")
            sweep.append(r)
            print(r, flush=True)
        for bm, bn, warps, stages in WIDE:
            tiles = qkernel.Tiles(bm, bn, warps, stages)
            qkernel.tiles_for = lambda fmt, rows, groups, streamed, t=tiles: t
            r = case(name, 32, pinned=False, rows_bf16=rows_bf16)
            r.update(bm=bm, bn=bn, warps=warps, stages=stages)
            sweep.append(r)
            print(r, flush=True)
        qkernel.tiles_for = real
        same += bitwise(rows_bf16, (name,), WIDE)
    with open(out, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "shape": [H, INTER, E],
                   "tiles": {"small": {f: vars(t) for f, t in qkernel.SMALL.items()},
                             "small_rows": qkernel.SMALL_ROWS, "large": vars(qkernel.LARGE)},
                   "results": results, "sweep": sweep, "bitwise": same}, fh, indent=1)


if __name__ == "__main__":
    main()
