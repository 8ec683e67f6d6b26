"""The host hand-off of one MoE layer, measured on this machine (`tide profile`).

The host-driven runtime (`--misses cpu|split|gpu`, or a disk tier) replays a step in pieces and
waits for each MoE layer's routing on the host before its misses can start; the all-resident and
streamed steps are one device program each. What that costs per layer is launch latency, a
host sync and the runtime's Python: none of it is in a bandwidth microbenchmark, and it does not
depend on the model's size. So a tiny synthetic model is decoded both ways, with every expert
in a GPU slot so that no miss runs, and the difference per forward pass is shared out over its
MoE layers. The planner adds it to every host-driven step (planner/model.py).
"""

from __future__ import annotations

import statistics
import tempfile

from tidecli.decode.settings import DecodeSettings
from tidecli.model.config import load_config
from tidecli.model.synth import write_checkpoint
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options

HANDOFF_LAYERS = 12  # layers of the tiny model (the first dense): enough to average over
HANDOFF_PROMPT = "Count from one to twenty, one number per line."
# (name, policy, misses): all-resident, then host-driven with every expert in a slot
ROUNDS = (("resident", "resident", "auto"), ("host", "tide", "gpu"))


def _median_forward_ms(engine: Engine, ids: list[int], gen_length: int) -> float:
    settings = DecodeSettings(gen_length=gen_length)
    for _ in engine.decoder(ids, DecodeSettings(gen_length=engine.opts.workload.block_length)
                            ).steps():  # warm-up: programs captured, kernels chosen
        pass
    times = [ev.forward_ms for ev in engine.decoder(ids, settings).steps()]
    return statistics.median(times)


def measure_host_layer_ms(device: str = "cuda", *, gen_length: int = 64) -> float:
    """ms per MoE layer that the host-driven runtime adds to a step on `device` (≥ 0)."""
    with tempfile.TemporaryDirectory(prefix="tide-handoff-") as tmp:
        path = write_checkpoint(tmp, preset="tiny", device=device,
                                overrides={"num_hidden_layers": HANDOFF_LAYERS})
        experts = load_config(path).num_experts
        ms: dict[str, float] = {}
        for name, policy, misses in ROUNDS:
            opts = engine_options(model=str(path), device=device, policy=policy,
                                  misses=misses, tau=1, experts_per_layer=None
                                  if policy == "resident" else experts)
            engine = Engine(opts, quiet=True)
            try:
                ids = engine.prompt_ids(HANDOFF_PROMPT)
                # the least of two medians: a noisy neighbour inflates, never deflates
                ms[name] = min(_median_forward_ms(engine, ids, gen_length) for _ in range(2))
                layers = engine.cfg.num_moe_layers
            finally:
                engine.close()
    return max(0.0, ms["host"] - ms["resident"]) / layers
