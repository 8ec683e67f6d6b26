# ruff: noqa: B023, E741  (timed lambdas run inside their loop iteration; I is the MoE width)
"""Can the GPU read missed experts straight from pinned host memory inside a step's graph?

Measures, for one layer of mini-sized experts in pinned RAM: a CUDA view of the pinned buffer,
gathering rows by a device index (index_select, and a Triton kernel that skips empty entries)
against copy-engine copies, the same under graph capture, overlap with a GEMM on another stream,
and grouped_mm reading weights straight from host memory.
Usage: python3 tools/bench/uva_probe.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch

RESULTS: dict = {}


def timed(fn, n=20) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


class Cai:
    def __init__(self, t: torch.Tensor, typestr: str, itemsize: int) -> None:
        n = t.numel() * t.element_size() // itemsize
        self.__cuda_array_interface__ = {"shape": (t.shape[0], n // t.shape[0]),
                                         "typestr": typestr, "data": (t.data_ptr(), False),
                                         "version": 3, "strides": None}


def main() -> None:
    out = sys.argv[1]
    dev = torch.device("cuda")
    E, H, I = 256, 2048, 512
    row = 3 * H * I
    host = torch.empty((E, row), dtype=torch.bfloat16, pin_memory=True)
    host.copy_(torch.randn((E, row), device=dev, dtype=torch.bfloat16) * 0.02)
    try:
        uva64 = torch.as_tensor(Cai(host, "<i8", 8), device=dev)
        RESULTS["view"] = {"ok": True, "device": str(uva64.device)}
    except Exception as exc:  # noqa: BLE001
        RESULTS["view"] = {"ok": False, "error": repr(exc)}
        json.dump(RESULTS, open(out, "w"), indent=1)
        return
    uva = uva64.view(torch.bfloat16).view(E, row)
    RESULTS["view"]["equal"] = bool(torch.equal(uva[7, :1000].cpu(), host[7, :1000]))
    ebytes = row * 2
    for S in (8, 32):
        idx = torch.randperm(E, device=dev)[:S]
        dst = torch.empty((S, row), dtype=torch.bfloat16, device=dev)
        d64 = dst.view(torch.int64).view(S, -1)
        ms = timed(lambda: torch.index_select(uva64, 0, idx, out=d64))
        RESULTS[f"index_select_i64_S{S}_gbps"] = S * ebytes / ms / 1e6
        ms = timed(lambda: torch.index_select(uva, 0, idx, out=dst))
        RESULTS[f"index_select_bf16_S{S}_gbps"] = S * ebytes / ms / 1e6
        hidx = idx.cpu().tolist()
        ms = timed(lambda: [dst[i].copy_(host[e], non_blocking=True) for i, e in enumerate(hidx)])
        RESULTS[f"dma_copy_S{S}_gbps"] = S * ebytes / ms / 1e6
        RESULTS[f"equal_S{S}"] = bool(torch.equal(dst, host[idx.cpu()].to(dev)))
    # graph capture of the index_select gather
    S = 8
    idx = torch.randperm(E, device=dev)[:S]
    dst = torch.empty((S, row), dtype=torch.bfloat16, device=dev)
    d64 = dst.view(torch.int64).view(S, -1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.index_select(uva64, 0, idx, out=d64)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.index_select(uva64, 0, idx, out=d64)
    idx.copy_(torch.randperm(E, device=dev)[:S])
    g.replay()
    torch.cuda.synchronize()
    RESULTS["graph_equal"] = bool(torch.equal(dst, host[idx.cpu()].to(dev)))
    RESULTS["graph_gather_S8_gbps"] = S * ebytes / timed(g.replay) / 1e6
    # Triton gather with skip
    try:
        import triton
        import triton.language as tl

        RESULTS["triton"] = triton.__version__

        @triton.jit
        def gather(src, idx, dst, ncols, BLOCK: tl.constexpr):
            r = tl.program_id(0)
            c = tl.program_id(1)
            e = tl.load(idx + r)
            if e >= 0:
                offs = c * BLOCK + tl.arange(0, BLOCK)
                m = offs < ncols
                v = tl.load(src + e.to(tl.int64) * ncols + offs, mask=m)
                tl.store(dst + r.to(tl.int64) * ncols + offs, v, mask=m)

        ncols = d64.shape[1]
        for S in (8, 32):
            for block in (1024, 4096):
                idx = torch.randperm(E, device=dev)[:S]
                dst = torch.empty((S, row), dtype=torch.bfloat16, device=dev)
                d64 = dst.view(torch.int64).view(S, -1)
                grid = (S, triton.cdiv(ncols, block))
                ms = timed(lambda: gather[grid](uva64, idx, d64, ncols, BLOCK=block))
                RESULTS[f"triton_S{S}_B{block}_gbps"] = S * ebytes / ms / 1e6
                RESULTS[f"triton_equal_S{S}"] = bool(torch.equal(dst, host[idx.cpu()].to(dev)))
            # half the entries empty: time should halve
            idx[S // 2:] = -1
            ms = timed(lambda: gather[grid](uva64, idx, d64, ncols, BLOCK=4096))
            RESULTS[f"triton_S{S}_half_empty_ms"] = ms
        RESULTS["triton_S32_full_ms"] = 32 * ebytes / RESULTS["triton_S32_B4096_gbps"] / 1e6
    except Exception as exc:  # noqa: BLE001
        RESULTS["triton_error"] = repr(exc)
    # overlap: gather on a side stream while a GEMM runs on the main stream
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    S = 8
    idx = torch.randperm(E, device=dev)[:S]
    dst = torch.empty((S, row), dtype=torch.bfloat16, device=dev)
    d64 = dst.view(torch.int64).view(S, -1)
    side = torch.cuda.Stream()

    def mm():
        for _ in range(4):
            a @ a

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.index_select(uva64, 0, idx, out=d64)
        mm()
        torch.cuda.current_stream().wait_stream(side)

    RESULTS["overlap_mm_ms"] = timed(mm)
    RESULTS["overlap_gather_ms"] = timed(lambda: torch.index_select(uva64, 0, idx, out=d64))
    RESULTS["overlap_both_ms"] = timed(both)
    # grouped_mm with weights read from host memory
    try:
        import torch.nn.functional as F  # noqa: N812

        def views(buf):
            n = buf.shape[0]
            return buf[:, : 2 * I * H].view(n, 2 * I, H), buf[:, 2 * I * H:].view(n, H, I)

        gu_h, dn_h = views(uva)
        dev_copy = host.to(dev)
        gu_d, dn_d = views(dev_copy)
        toks = 64
        x = torch.randn(toks, H, device=dev, dtype=torch.bfloat16)
        counts = torch.zeros(E, dtype=torch.int32, device=dev)
        chosen = torch.randperm(E)[:8]
        counts[chosen.to(dev)] = toks // 8
        offs = torch.cumsum(counts, 0, dtype=torch.int32)

        def run(gu, dn):
            h = torch._grouped_mm(x, gu.transpose(-2, -1), offs=offs)
            g_, u = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(g_) * u, dn.transpose(-2, -1), offs=offs)

        ref = run(gu_d, dn_d)
        got = run(gu_h, dn_h)
        torch.cuda.synchronize()
        RESULTS["grouped_mm_host_equal"] = bool(torch.equal(ref, got))
        RESULTS["grouped_mm_host_ms"] = timed(lambda: run(gu_h, dn_h))
        RESULTS["grouped_mm_dev_ms"] = timed(lambda: run(gu_d, dn_d))
    except Exception as exc:  # noqa: BLE001
        RESULTS["grouped_mm_host_error"] = repr(exc)[:300]
    json.dump(RESULTS, open(out, "w"), indent=1)
    print(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
