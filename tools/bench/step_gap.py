"""Where a denoising step's wall time goes between the GPU's work and the host's, without a
profiler (CUPTI slows graph launches): host clocks around the step program and each graph
launch, CUDA events around the forward, over the denoising steps of one generation.

Usage: PYTHONPATH=. python tools/bench/step_gap.py MODEL [--policy resident] [--vram 10]
       [--pieces 1,2,4] [--experts-dtype bf16] [-o out.json]
Per step (mean over denoising steps, after a warm-up generation):
  wall        between two steps as the decoder's caller sees them
  host_run    StepProgram.run on the host (inputs, launches, the runtime's host work)
  launch      the host inside CUDAGraph.replay, summed over the step's graphs
  gpu_fwd     GPU clock from the run's first event to the event after its last launch
  gpu_rest    GPU clock from the end of one forward to the start of the next (the decoder's
              choice of tokens, the host sync, Python, the next step's inputs)
--pieces N (resident only) captures the one-graph step as N graphs of whole segments, so the
GPU starts the first while the host launches the next: an experiment, not an option of tide.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tidecli.decode.settings import DecodeSettings
from tidecli.model import program as prog_mod
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options

PROMPT = "Explain why the sky is blue to a ten-year-old."
ORIGINAL_CAPTURE = prog_mod.StepProgram._capture


def split_capture(pieces: int):
    """StepProgram._capture with the single-graph step cut into `pieces` graphs."""
    original = ORIGINAL_CAPTURE

    def capture(self) -> None:
        if not self.single or pieces <= 1:
            return original(self)
        segs = self._segments()
        self.start.fill_(self.cache.capacity - self.T)
        side = prog_mod.side_stream(self.device, "warmup")
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                for seg in segs:
                    seg()
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        size = -(-len(segs) // pieces)
        self.graphs = []
        for i in range(0, len(segs), size):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                for seg in segs[i: i + size]:
                    seg()
            self.graphs.append(g)
    return capture


class Clock:
    def __init__(self) -> None:
        self.runs: list[tuple] = []  # (kind, host_run_s, launch_s, ev_start, ev_end)
        self.launch = 0.0

    def install(self) -> None:
        run, replay = prog_mod.StepProgram.run, torch.cuda.CUDAGraph.replay
        clock = self

        def timed_replay(g):
            t = time.perf_counter()
            replay(g)
            clock.launch += time.perf_counter() - t

        def timed_run(self, ids, start, info):
            e0, e1 = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            clock.launch = 0.0
            t = time.perf_counter()
            e0.record()
            out = run(self, ids, start, info)
            e1.record()
            clock.runs.append((info.kind, time.perf_counter() - t, clock.launch, e0, e1))
            return out
        prog_mod.StepProgram.run = timed_run
        torch.cuda.CUDAGraph.replay = timed_replay


def measure(eng: Engine, clock: Clock, ids: list[int], gen: int) -> dict:
    for _ in eng.decoder(ids, DecodeSettings(gen_length=gen)).steps():  # capture, warm up
        pass
    torch.cuda.synchronize()
    clock.runs.clear()
    marks = []
    t = time.perf_counter()
    for ev in eng.decoder(ids, DecodeSettings(gen_length=gen)).steps():
        marks.append((ev.block, time.perf_counter()))
    torch.cuda.synchronize()
    runs = clock.runs
    steps = [i for i, r in enumerate(runs) if r[0] == "step"]
    fwd = [runs[i][3].elapsed_time(runs[i][4]) for i in steps]
    rest = [runs[i][4].elapsed_time(runs[i + 1][3]) for i in steps if i + 1 < len(runs)
            and runs[i + 1][0] == "step"]
    walls = [(b[1] - a[1]) * 1e3 for a, b in zip(marks, marks[1:], strict=False)
             if a[0] == b[0]]  # a block's end runs a commit pass before the next step
    ms = lambda xs: round(statistics.mean(xs), 3) if xs else None  # noqa: E731
    return {"steps": len(steps), "wall": ms(walls),
            "host_run": ms([runs[i][1] * 1e3 for i in steps]),
            "launch": ms([runs[i][2] * 1e3 for i in steps]),
            "gpu_fwd": ms(fwd), "gpu_rest": ms(rest),
            "graphs": None, "total_s": round(time.perf_counter() - t, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--policy", default="resident")
    ap.add_argument("--misses", default="stream")
    ap.add_argument("--vram", type=float, default=10.0)
    ap.add_argument("--experts-dtype", default="bf16")
    ap.add_argument("--pieces", default="1")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    resident = a.policy == "resident"
    clock = Clock()
    clock.install()
    rows = []
    eng = Engine(engine_options(model=a.model, policy=a.policy, misses=a.misses,
                                vram_gib=None if resident else a.vram, profile="h200",
                                tau=None if resident else 1, experts_dtype=a.experts_dtype),
                 quiet=True)
    ids = eng.prompt_ids(PROMPT)
    for pieces in [int(p) for p in a.pieces.split(",")]:
        prog_mod.StepProgram._capture = split_capture(pieces)
        eng.reset_programs()  # captured again, in `pieces` graphs
        row = {"policy": a.policy, "pieces": pieces, "experts_dtype": a.experts_dtype,
               **({} if resident else {"vram": a.vram, "misses": a.misses}),
               **measure(eng, clock, ids, a.gen_length)}
        prog = next(iter(eng.runner._programs.values()))
        row["graphs"] = len(prog.graphs or [])
        print(json.dumps(row), flush=True)
        rows.append(row)
    eng.close()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
