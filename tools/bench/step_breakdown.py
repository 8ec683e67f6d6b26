"""Resident generation on a checkpoint with the time of a step split into its parts.

Usage: PYTHONPATH=. python tools/bench/step_breakdown.py MODEL [--gen-length N] [--out DIR]
Reports steps/s of the captured step, the HBM-bandwidth bound for the bytes one step reads, and
a split into parts (attention, router, experts, shared expert, lm_head, ...) timed on the eager
path with events around each part: that synchronisation inflates every part, so the parts only
compare with each other (tools/bench/step_trace.py profiles the captured step).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tidecli.decode.diffusion import BlockDiffusionDecoder, DecodeSettings
from tidecli.memory import device_dense_bytes
from tidecli.model.timing import StepTimers, profile_parts
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import LoadOptions, engine_options


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--out", default=".")
    ap.add_argument("--hbm-gbps", type=float, default=4300.0, help="measured D2D bandwidth")
    ap.add_argument("--kernel", default="auto")
    args = ap.parse_args()
    t0 = time.perf_counter()
    opts = engine_options(model=args.model)
    eng = Engine(replace(opts, load=LoadOptions(model=args.model, kernel=args.kernel)),
                 quiet=True)
    load_s = time.perf_counter() - t0
    ids = eng.prompt_ids("Write a story about a lighthouse keeper who finds a message.")
    settings = DecodeSettings(gen_length=args.gen_length)
    # warm-up generation (kernels, allocator), then the timed one
    for _ in eng.decoder(ids, DecodeSettings(gen_length=32)).steps():
        pass
    torch.cuda.synchronize()
    d = eng.decoder(ids, settings)
    t = time.perf_counter()
    for _ in d.steps():
        pass
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    r = d.result
    # breakdown over a second run with per-part events: the eager path, each part marked
    eng.runtime.enable_trace()
    timers = StepTimers(eng.device)
    undo = profile_parts(eng.model, timers)
    d2 = BlockDiffusionDecoder(eng.model, ids, settings, mask_id=eng.tokenizer.ids.mask,
                               eos_ids={eng.tokenizer.ids.eos}, device=eng.device)
    steps = 0
    for _ in d2.steps():
        timers.stop()
        steps += 1
    undo()
    parts = {k: v / max(1, d2.result.forwards) for k, v in timers.totals.items()}
    tr = eng.runtime.trace.steps_only()
    distinct = (tr.array() > 0).sum(axis=2)  # [steps, layers]
    cfg = eng.cfg
    dense = device_dense_bytes(cfg)
    experts_bytes = float(distinct.sum(axis=1).mean()) * cfg.expert_bytes()
    bound_ms = (dense + experts_bytes) / (args.hbm_gbps * 1e9) * 1e3
    out = {
        "model": str(eng.path), "gpu": torch.cuda.get_device_name(), "kernel": eng.runtime.kernel,
        "load_seconds": round(load_s, 1), "tokens": len(r.token_ids), "steps": r.steps,
        "forwards": r.forwards, "wall_s": round(wall, 3),
        "steps_per_s": round(r.steps / wall, 2), "tokens_per_s": round(len(r.token_ids) / wall, 2),
        "tokens_per_step": round(r.tokens_per_step, 2),
        "ms_per_forward_measured": round(wall * 1000 / r.forwards, 3),
        "ms_per_forward_parts": {k: round(v, 3) for k, v in sorted(parts.items())},
        "distinct_experts_per_layer_step": round(float(distinct.mean()), 1),
        "bytes_per_step_dense": dense, "bytes_per_step_experts": int(experts_bytes),
        "hbm_bound_ms": round(bound_ms, 3),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    print(json.dumps(out, indent=1))
    Path(args.out, "step_breakdown.json").write_text(json.dumps(out, indent=2))
    np.save(Path(args.out, "distinct.npy"), distinct)


if __name__ == "__main__":
    main()
