"""Hit rates of tide's runtimes against the planner's placement model, on the CPU: a tiny
synthetic model with the LLaDA2 family's routing width (256 experts, 8 per token; 3 MoE layers)
decoded with `--policy tide --tau 1 --experts-per-layer B`, with streamed, cpu, split and gpu
misses; the denoising steps' measured hit rate (all of them, a generation's first step, the
other blocks' first steps, the rest) beside the one the planner's statistics give on the same
routing trace (planner/stats.py, a refresh every step; a generation's first step is not in it).

    PYTHONPATH=. python3 tools/bench/hit_rate_probe.py [B] [MODEL_FOLDER]
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

from tidecli.decode.settings import DecodeSettings
from tidecli.model.config import load_config
from tidecli.model.synth import write_checkpoint
from tidecli.planner.stats import trace_stats
from tidecli.runtime.engine import Engine
from tidecli.runtime.handoff import FAMILY_ROUTING
from tidecli.runtime.options import engine_options

MAX_AGE = 12  # steps per block the statistics look ahead (mini decodes ≈ 13 per block)


def main() -> None:
    budget = int(sys.argv[1]) if len(sys.argv) > 1 else 96
    path = sys.argv[2] if len(sys.argv) > 2 else "hit-rate-probe-model"
    if not os.path.exists(os.path.join(path, "config.json")):
        write_checkpoint(path, preset="tiny", device="cpu",
                         overrides={"num_hidden_layers": 4, **FAMILY_ROUTING})
    cfg = load_config(path)
    with open("tools/bench/bench_prompts.txt") as fh:
        prompts = [line.strip() for line in fh if line.strip()]
    for misses in ("stream", "cpu", "split", "gpu"):
        opts = engine_options(model=path, device="cpu", policy="tide", misses=misses, tau=1,
                              experts_per_layer=budget)
        eng = Engine(opts, quiet=True)
        try:
            rt = eng.runtime
            trace = rt.enable_trace()
            hits: dict[str, int] = defaultdict(int)
            pairs: dict[str, int] = defaultdict(int)
            for prompt in prompts:
                ids = eng.prompt_ids(prompt)
                first = None
                for ev in eng.decoder(ids, DecodeSettings(gen_length=64)).steps():
                    first = ev.block if first is None else first
                    kind = "first" if ev.block == first and ev.step == 0 else \
                        "entry" if ev.step == 0 else "rest"
                    hits[kind] += ev.experts.gpu_hits
                    pairs[kind] += ev.experts.pairs
            rt.trace = None
            stats = trace_stats(trace.steps_only(), cfg=cfg, max_age=MAX_AGE)
            miss_pairs, _ = stats.block_mean_miss(1, MAX_AGE)
            model = 1 - float(miss_pairs[:, budget].mean())
            run = rt.run_stats.summary()
            share = {k: hits[k] / pairs[k] for k in pairs}
            print(f"{misses:6s} hit, denoising steps {sum(hits.values()) / sum(pairs.values()):.4f}"
                  f" (a generation's first {share['first']:.4f}, other blocks' first "
                  f"{share['entry']:.4f}, the rest {share['rest']:.4f}) · every forward "
                  f"{run['hit_rate']:.4f} · the planner's model {model:.4f} · promotions "
                  f"{run['promotions']}", flush=True)
        finally:
            eng.close()


if __name__ == "__main__":
    main()
