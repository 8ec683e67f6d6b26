"""How well copying experts from pinned RAM overlaps the grouped expert GEMM, by copy kind.

Usage: PYTHONPATH=. python tools/bench/overlap_probe.py OUT.json [--rows 2,4] [--programs 1,4,16]

LLaDA2.0-mini's expert shape (hidden 2048, intermediate 512, bf16), 76 slots, 32 tokens × top-8
over 70 distinct slots: the streamed runtime's layer at 10 GiB. Each case is a CUDA graph of 20
such layers, replayed 50 times after a warm-up; ms per layer (median of 5 timings):

  gemm            the grouped expert pass (`run_pairs`, grouped_mm) alone
  gather R        R expert rows copied by the gather kernel (experts/gather.py, the kernel the
                  streamed step uses; --programs sets its programs per row)
  memcpy R        the same rows by the copy engine (cudaMemcpyAsync, addresses fixed)
  gemm+gather R   both, the gather on a side stream queued first, joined after the GEMM
  gemm+memcpy R   the same with the copy engine
  small           a chain of ≈ 120 small kernels, as a layer has around its GEMMs (elementwise
                  on [32, 2048], gathers and scatters of pair rows [256, 2048])
  small+gather R, small+memcpy R   that chain beside the copies
  empty pass      a grouped pass with no pairs (as a streamed layer's placed or streamed-from-RAM
                  pass often is): its kernels run all the same
  cond skip       the same pass under torch.cond with a device predicate that is false, which
                  CUDA graphs can capture as a conditional node where the installed torch
                  supports it (else the error says why); "cond run" with the predicate true
                  must give the pass's rows

A copy that overlaps the GEMM perfectly makes gemm+copy = max(gemm, copy); one that does not,
their sum. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from tidecli.experts import gather
from tidecli.experts.compute import pool_views, run_pairs

H, INTER, SLOTS, EXPERTS, TOKENS, TOPK, DISTINCT, LAYERS = 2048, 512, 76, 256, 32, 8, 70, 20


def _time(fn, reps: int = 50) -> float:
    """ms per layer of `fn` (which runs LAYERS layers) captured as one graph."""
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up: kernels chosen, workspaces allocated
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        fn()
    out = []
    for _ in range(5):
        g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / reps / LAYERS)
    return round(statistics.median(out), 4)


def _cond(x, pair_slot, empty_pass, gate_up, down, ms, layers) -> str:
    """Time the empty pass skipped by torch.cond inside the graph, and check that the taken
    branch gives the pass's rows; returns "ok" or why it could not."""
    def branch(on: bool):
        pred = torch.tensor(on, device=x.device)
        slots = pair_slot if on else torch.full_like(pair_slot, -1)

        def run_pass(xx):
            return run_pairs("grouped_mm", xx, slots, gate_up, down, TOPK)

        def skip(xx):
            return torch.zeros((slots.numel(), xx.shape[1]), dtype=xx.dtype, device=xx.device)

        return lambda: torch.cond(pred, run_pass, skip, (x,))

    try:
        ms["cond skip"] = _time(layers(branch(False), None))
        ms["cond run"] = _time(layers(branch(True), None))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = branch(True)()
        g.replay()
        ref = run_pairs("grouped_mm", x, pair_slot, gate_up, down, TOPK)
        torch.cuda.synchronize()
        return "ok" if torch.equal(y, ref) else "the captured branch gave other rows"
    except Exception as exc:  # the installed torch may not capture torch.cond
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--rows", default="2,4")
    ap.add_argument("--programs", default="4")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: overlap_probe.py needs a CUDA GPU")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    row = 3 * H * INTER
    host = (torch.randn(EXPERTS, row, generator=g) * 0.02).to(torch.bfloat16).pin_memory()
    host_view = gather.device_view(host, dev)
    pool = torch.empty(SLOTS, row, dtype=torch.bfloat16, device=dev)
    pool.copy_(host[:SLOTS])
    gate_up, down = pool_views(pool, H, INTER)
    x = (torch.randn(TOKENS, H, generator=g) * 0.5).to(torch.bfloat16).to(dev)
    used = torch.randperm(SLOTS, generator=g)[:DISTINCT]
    pair_slot = used[torch.randint(0, DISTINCT, (TOKENS * TOPK,), generator=g)].to(dev)
    free = [s for s in range(SLOTS) if s not in set(used.tolist())]  # slots this step leaves
    side = torch.cuda.Stream()

    def gemm():
        run_pairs("grouped_mm", x, pair_slot, gate_up, down, TOPK)

    pairs = torch.randn(TOKENS * TOPK, H, generator=g).to(torch.bfloat16).to(dev)
    perm = torch.randperm(TOKENS * TOPK, generator=g).to(dev)
    acc = torch.zeros(TOKENS, H, dtype=torch.bfloat16, device=dev)
    tok = (torch.arange(TOKENS * TOPK) // TOPK).to(dev)

    def small():
        y = x
        for _ in range(15):  # 6 small kernels a round: elementwise, a gather, a scatter-add
            y = torch.nn.functional.silu(y) * 1.001 + x
            p = pairs.index_select(0, perm)
            acc.index_add_(0, tok, p[:, :H])
            y = y + acc
        for _ in range(5):
            y = y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(y.dtype)
        return y

    def copier(kind: str, r: int):
        src = list(range(SLOTS, SLOTS + r))  # experts not in a slot
        dst = free[:r]
        src_t = torch.tensor(src, device=dev)
        dst_t = torch.tensor(dst, device=dev)

        def go():
            if kind == "gather":
                gather.copy_rows(host_view, src_t, pool, dst_t)
            else:
                for s, d in zip(src, dst, strict=True):
                    pool[d].copy_(host[s], non_blocking=True)
        return go

    def layers(main, copy):
        def run():
            for _ in range(LAYERS):
                if copy is None:
                    main()
                    continue
                cur = torch.cuda.current_stream()
                side.wait_stream(cur)
                with torch.cuda.stream(side):
                    copy()
                if main is not None:
                    main()
                cur.wait_stream(side)
        return run

    res = {"shape": {"hidden": H, "intermediate": INTER, "slots": SLOTS, "tokens": TOKENS,
                     "top_k": TOPK, "distinct": DISTINCT, "layers": LAYERS},
           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "ms_per_layer": {}}
    ms = res["ms_per_layer"]
    ms["gemm"] = _time(layers(gemm, None))
    ms["small"] = _time(layers(small, None))
    for r in (int(v) for v in a.rows.split(",")):
        ms[f"memcpy {r}"] = _time(layers(None, copier("memcpy", r)))
        ms[f"gemm+memcpy {r}"] = _time(layers(gemm, copier("memcpy", r)))
        ms[f"small+memcpy {r}"] = _time(layers(small, copier("memcpy", r)))
        for p in (int(v) for v in a.programs.split(",")):
            gather.PROGRAMS_PER_ROW = p
            ms[f"gather {r} ({p}/row)"] = _time(layers(None, copier("gather", r)))
            ms[f"gemm+gather {r} ({p}/row)"] = _time(layers(gemm, copier("gather", r)))
            ms[f"small+gather {r} ({p}/row)"] = _time(layers(small, copier("gather", r)))
    empty_slots = torch.full_like(pair_slot, -1)

    def empty_pass():
        return run_pairs("grouped_mm", x, empty_slots, gate_up, down, TOPK)

    ms["empty pass"] = _time(layers(empty_pass, None))
    res["cond"] = _cond(x, pair_slot, empty_pass, gate_up, down, ms, layers)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    for k, v in ms.items():
        print(f"{k:24s} {v:8.4f} ms")
    print("torch.cond in a CUDA graph:", res["cond"])


if __name__ == "__main__":
    main()
