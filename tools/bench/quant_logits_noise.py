"""How far bf16's own rounding moves a model's logits, beside each compressed format: on the
same inputs (two prompts, each followed by the bf16 reply with its last block masked), the KL
divergence and top-1 agreement against the bf16 run of the model in fp32, of another expert
kernel, and of each format (bench/quality.py). On random weights the logits are sensitive, so
this puts the formats' figures next to the rounding noise every bf16 run already has.

    PYTHONPATH=. python3 tools/bench/quant_logits_noise.py MODEL OUT.json
"""

from __future__ import annotations

import json
import sys

import torch

from tidecli.bench.quality import compare_logits, probe_inputs, probe_logits
from tidecli.bench.spec import PROMPTS
from tidecli.decode.diffusion import DecodeSettings
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]

    def engine(**kw) -> Engine:
        return Engine(engine_options(model=model, device="cuda", **kw), quiet=True)

    e = engine()
    ids = [e.prompt_ids(p) for p in PROMPTS[:2]]
    replies = []
    for i in ids:
        d = e.decoder(i, DecodeSettings(gen_length=64))
        for _ in d.steps():
            pass
        replies.append(d.result.token_ids)
    inputs = probe_inputs(ids, replies, block=32, mask_id=e.tokenizer.ids.mask)
    ref = probe_logits(e, inputs)
    e.close()
    results = {}
    for name, kw in (("bf16 loop kernel", {"kernel": "loop"}), ("fp32 model", {"dtype": "fp32"}),
                     ("int8", {"experts_dtype": "int8"}), ("fp8", {"experts_dtype": "fp8"}),
                     ("int4", {"experts_dtype": "int4"})):
        e = engine(**kw)
        results[name] = compare_logits(ref, probe_logits(e, inputs))
        e.close()
        del e
        torch.cuda.empty_cache()
        print(name, results[name], flush=True)
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
