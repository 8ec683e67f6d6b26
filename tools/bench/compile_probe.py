"""Where a step's wall time goes with --compile on and off: per step, the GPU time of the
step's graph (CUDA events around the replay), the host time of the replay call, and the wall
time of the whole step as the decoder sees it.

Usage: PYTHONPATH=. python tools/bench/compile_probe.py MODEL [--policy resident] [--modes on,off]
"""
import argparse
import statistics
import time

import torch

from tidecli.decode.settings import DecodeSettings
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--policy", default="resident")
ap.add_argument("--vram", type=float, default=None)
ap.add_argument("--modes", default="off,on,off,on", help="--compile of each engine, in order")
a = ap.parse_args()
prompts = [line.strip() for line in open("tools/bench/bench_prompts.txt") if line.strip()]
real_replay = torch.cuda.CUDAGraph.replay
rec: list = []


def timed_replay(self):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    s.record()
    real_replay(self)
    e.record()
    rec.append((s, e, time.perf_counter() - t))


torch.cuda.CUDAGraph.replay = timed_replay
for mode in a.modes.split(","):
    eng = Engine(engine_options(model=a.model, policy=a.policy, vram_gib=a.vram,
                                compile=mode), quiet=True)
    for n in range(3):
        ids = eng.prompt_ids(prompts[n % 2])
        rec.clear()
        walls = [ev.forward_ms for ev in eng.decoder(ids, DecodeSettings(gen_length=64)).steps()]
        torch.cuda.synchronize()
        gpu = [s.elapsed_time(e) for s, e, _ in rec]
        host = [h * 1e3 for _, _, h in rec]
        if n:
            print(f"{mode} run {n}: steps {len(walls)} wall median {statistics.median(walls):.2f} "
                  f"ms; replays {len(rec)}: GPU median {statistics.median(gpu):.2f} ms, host "
                  f"call median {statistics.median(host):.3f} ms", flush=True)
    eng.close()
    del eng
