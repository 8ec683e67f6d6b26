"""Tokens per step of synthetic checkpoints against the lm_head scale (to pick synth defaults).

Usage (with PYTHONPATH=.):
    python tools/bench/logit_scale.py WORKDIR --preset mini --layers 4 --scales 10,20,40
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tidecli.decode.diffusion import DecodeSettings
from tidecli.model.synth import write_checkpoint
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--scales", default="10,20,40")
    ap.add_argument("--gen-length", type=int, default=128)
    args = ap.parse_args()
    for scale in [float(s) for s in args.scales.split(",")]:
        path = Path(args.work) / f"ls{scale:g}"
        write_checkpoint(path, preset=args.preset, layers=args.layers, force=True,
                         logit_scale=scale)
        eng = Engine(engine_options(model=str(path)), quiet=True)
        for prompt in ("Write a haiku about the sea.", "Explain expert offload in one line."):
            d = eng.decoder(eng.prompt_ids(prompt), DecodeSettings(gen_length=args.gen_length))
            for _ in d.steps():
                pass
            r = d.result
            print(f"scale {scale:g}: {r.steps} steps, {len(r.token_ids)} tokens, "
                  f"{r.tokens_per_step:.2f} tokens/step, distinct {len(set(r.token_ids))}",
                  flush=True)
        eng.close()
        del eng
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
