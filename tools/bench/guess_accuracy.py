"""How well a checkpoint's routing can be guessed ahead: the next layer's experts from this
layer's input (what `--prefetch layer` reads), the next step's entering experts from the
ones ranked just below the choice (not built), and a block's first step from the previous
block's first step (not built), scored on real decoding (tidecli/bench/guesses.py).

Usage: PYTHONPATH=. python tools/bench/guess_accuracy.py MODEL [--device cpu] [--ranked 2]
    [--prompts tools/bench/bench_prompts.txt] [--gen-length 64]
Runs all-resident (the routing is the model's own, unchanged) and prints one JSON object.
       PYTHONPATH=. python tools/bench/guess_accuracy.py --drifting [--ranked 2] [--layers 19]
    [--blocks 3] [--steps 16]
scores the step guess on the drifting synthetic workload instead (bench/drift.py; no model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tidecli.bench.guesses import GuessRecorder, score
from tidecli.decode.settings import DecodeSettings
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--drifting", action="store_true")
    ap.add_argument("--layers", type=int, default=19)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ranked", type=int, default=2)
    ap.add_argument("--prompts", type=Path, default=None)
    ap.add_argument("--gen-length", type=int, default=64)
    a = ap.parse_args()
    if a.drifting:
        from tidecli.bench.drift import DriftingScores
        from tidecli.bench.guesses import score_drifting

        gen = DriftingScores(num_experts=256, experts_per_token=8, num_layers=a.layers)
        s = score_drifting(gen, blocks=a.blocks, steps=a.steps, ranked=a.ranked)
        print(json.dumps({"workload": "drifting", "layers": a.layers, "blocks": a.blocks,
                          "steps": a.steps, "ranked": a.ranked, "step": s.to_dict()}))
        return
    if a.model is None:
        ap.error("give MODEL, or --drifting")
    eng = Engine(engine_options(model=a.model, device=a.device, policy="resident",
                                graphs=False), quiet=True)
    rec = GuessRecorder([eng.model.w.layers[layer].router for layer in eng.cfg.moe_layers],
                        ranked=a.ranked)
    eng.set_router(rec)
    prompts = a.prompts.read_text().splitlines() if a.prompts else \
        ["Explain why the sky is blue to a ten-year-old."]
    steps = 0
    for text in (p for p in prompts if p.strip()):
        for _ in eng.decoder(eng.prompt_ids(text), DecodeSettings(gen_length=a.gen_length)).steps():
            steps += 1
    scores = score(rec.forwards)
    print(json.dumps({"model": Path(a.model).name, "device": a.device, "ranked": a.ranked,
                      "prompts": len(prompts), "steps": steps,
                      **{name: s.to_dict() for name, s in scores.items()}}))
    eng.close()


if __name__ == "__main__":
    main()
