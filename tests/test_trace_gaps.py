"""tools/bench/trace_gaps.py on a hand-made profiler trace: the compute stream's gaps, the part
the copy stream was busy, and the host's blocking syncs by cause."""

import gzip
import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench" / "trace_gaps.py"


def _tool():
    spec = importlib.util.spec_from_file_location("trace_gaps", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def X(cat, name, ts, dur, tid, pid=0):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_gaps_copy_overlap_and_syncs(tmp_path):
    ev = [
        # compute stream (tid 7): kernels at 0-100, 1100-1200, 1300-1400, 3400-3500
        X("kernel", "k1", 0, 100, 7), X("kernel", "k2", 1100, 100, 7),
        X("kernel", "k3", 1300, 100, 7), X("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)",
                                            3400, 100, 7),
        # copy stream (tid 13): busy 500-900 (inside the first gap) and 5000-5100 (outside)
        X("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 500, 400, 13),
        X("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 5000, 100, 13),
        # the host: a torch.tensor(...).to(device) whose sync spans the second gap
        X("cpu_op", "aten::lift_fresh", 1390, 1, 1), X("cpu_op", "aten::to", 1400, 1950, 1),
        X("cuda_runtime", "cudaStreamSynchronize", 1410, 1900, 1),
        X("cuda_runtime", "cudaStreamSynchronize", 3600, 5, 1),
        X("cpu_op", "aten::add", 3590, 2, 1),
        {"ph": "i", "name": "marker", "ts": 0},
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    tool = _tool()
    r = tool.analyse(tool.load(path), min_gap_us=300)
    # gaps over 300 µs: 100-1100 (1000 µs) and 1400-3400 (2000 µs); 1200-1300 is too short
    assert r["gaps"] == 2 and r["gap_ms"] == 3.0
    assert r["compute_busy_ms"] == 0.4 and r["copy_busy_ms"] == 0.5
    assert r["gap_with_copy_busy_ms"] == 0.4  # the copy inside the first gap only
    assert r["stream_syncs"]["after a host tensor made by torch.tensor (aten::lift_fresh)"] \
        == {"count": 1, "ms": 1.9}
    assert r["stream_syncs"]["other"]["count"] == 1
    first = r["longest_gaps"][0]
    assert first["gap_ms"] == 2.0 and any("cudaStreamSynchronize" in h for h in first["host"])
    assert tool.per_step(r, 2)["gap_ms"] == 1.5


def test_kernels_per_stream_by_name():
    ev = [X("kernel", "gemm", 0, 300, 7), X("kernel", "gemm", 400, 100, 7),
          X("kernel", "plan", 600, 50, 7), X("kernel", "gather", 0, 200, 13),
          X("cpu_op", "aten::mm", 0, 999, 1)]
    out = _tool().kernels(ev, top=1, steps=2)
    assert [s["stream"] for s in out] == ["all", "7", "13"]  # most events first
    assert out[0]["busy_ms"] == 0.325 and out[0]["events"] == 2.0
    assert out[1]["busy_ms"] == 0.225 and out[1]["events"] == 1.5
    assert out[1]["top"] == ["0.200 ms  x1.0  gemm"]  # 400 µs over 2 steps, 2 calls over 2
    assert out[2]["top"] == ["0.100 ms  x0.5  gather"]


def test_alone_counts_only_the_time_nothing_else_ran():
    # gather 0-500 on one stream; other kernels 100-200 and 300-700 on another
    ev = [X("kernel", "gather_rows", 0, 500, 13), X("kernel", "gemm", 100, 100, 7),
          X("kernel", "plan", 300, 400, 7), X("kernel", "gather_rows", 900, 100, 13)]
    r = _tool().alone(ev, "gather", steps=1)
    # busy 0-700 and 900-1000 (800 µs); others 100-200 and 300-700 (500 µs)
    assert r == {"name": "gather", "busy_ms": 0.8, "others_busy_ms": 0.5, "alone_ms": 0.3}


def test_beside_compares_a_kernels_median_with_and_without_the_named_one():
    # "k" takes 2 µs alone (25 calls) and 8 µs while a gather runs (25 calls inside 0-1000)
    ev = [X("kernel", "gather_rows", 0, 1000, 13)]
    ev += [X("kernel", "k", 10 + 30 * i, 8, 7) for i in range(25)]
    ev += [X("kernel", "k", 2000 + 10 * i, 2, 7) for i in range(25)]
    ev += [X("kernel", "rare", 5, 50, 7)]  # too few calls to compare
    r = _tool().beside(ev, "gather", top=3, steps=1)
    assert r["extra_ms"] == 0.15  # 25 calls × (8 − 2) µs
    assert r["top"] == ["0.150 ms  median 2.0 -> 8.0 us  x25.0  k"]


def test_forwards_are_cut_after_the_last_kernel_of_each():
    ev = [X("kernel", "attn", 0, 10, 7), X("kernel", "gather_rows", 5, 20, 13),
          X("kernel", "lm_head", 30, 10, 7), X("kernel", "attn", 50, 10, 7),
          X("kernel", "lm_head", 70, 30, 7), X("kernel", "attn", 200, 5, 7)]  # unfinished
    out = _tool().forwards(ev, "lm_head", "gather")
    assert out == [{"span_ms": 0.04, "kernels": 3, "gather": 0.02},
                   {"span_ms": 0.05, "kernels": 2, "gather": 0.0}]
