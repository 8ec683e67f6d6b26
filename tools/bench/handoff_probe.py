"""The host hand-off per MoE layer (runtime/handoff.py) measured on the tiny model as `tide
profile` does, and on the tiny model with the LLaDA2 family's routing width (256 experts, 8 per
token), with each run's hit rate; JSON to OUT.

    PYTHONPATH=. python3 tools/bench/handoff_probe.py OUT.json [cuda|cpu]
"""

from __future__ import annotations

import json
import sys

from tidecli.runtime.handoff import FAMILY_ROUTING, measure_host_layer_ms


def main() -> None:
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    found = {}
    for name, routing in (("tiny", None), ("family", FAMILY_ROUTING)):
        hits: dict[str, float] = {}
        ms = measure_host_layer_ms(device, routing=routing, hit_rates=hits)
        found[name] = {"ms_per_moe_layer": {m: round(v, 4) for m, v in ms.items()},
                       "hit_rate": {m: round(v, 4) for m, v in hits.items()}}
        print(name, found[name], flush=True)
    with open(sys.argv[1], "w") as fh:
        json.dump({"device": device, "routing": found}, fh, indent=1)


if __name__ == "__main__":
    main()
