"""Write the routing trace of the bench's synthetic workload (bench/synthetic.py) for a model
config, so `tide plan --trace` predicts with the same routing the benchmark replays.
Usage: python3 tools/bench/synthetic_trace.py MODEL_DIR OUT.npz [--blocks 8] [--steps 25]"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tidecli.bench.synthetic import SyntheticRouting
from tidecli.experts.trace import RoutingTrace
from tidecli.model.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25, help="denoising steps per block")
    ap.add_argument("--block-length", type=int, default=32)
    a = ap.parse_args()
    cfg = load_config(a.model)
    gen = SyntheticRouting(cfg, device=torch.device("cpu"), block_length=a.block_length)
    tr = RoutingTrace(cfg.num_moe_layers, cfg.num_experts, list(cfg.moe_layers),
                      meta={"block_length": a.block_length, "workload": "synthetic"})
    for b in range(a.blocks):
        for s in range(a.steps):
            assign = gen.step(b, s)  # [M, T, k]
            counts = np.stack([np.bincount(assign[j].reshape(-1), minlength=cfg.num_experts)
                               for j in range(cfg.num_moe_layers)])
            tr.append(counts, kind="step", block=b, step=s, tokens=a.block_length)
    print(tr.save(a.out))


if __name__ == "__main__":
    main()
