"""The host hand-off of one MoE layer, measured on this machine (`tide profile`).

The host-driven runtime (`--misses cpu|split|gpu`, or a disk tier) replays a step in pieces: each
MoE layer's routing is read by the host, its misses are grouped and computed (on the CPU, or
copied into scratch slots and computed by the GPU with eager kernels), and the results are put
back before the next layer may start. What that costs beyond the experts' own compute and copies
is launch latency, host syncs and the runtime's Python, none of which a bandwidth
microbenchmark sees, and little of which depends on the model's size. So a tiny synthetic model
is decoded all-resident and then host-driven with half of each layer's experts in slots, where
about 5 % of the routed pairs miss, as in tide's runs of mini at 6-10 GiB (their compute and
copies are negligible at the tiny size), and the difference per forward pass is
shared out over its MoE layers, per miss mode. The planner adds it to every MoE layer of a
host-driven step (planner/model.py).
"""

from __future__ import annotations

import statistics
import tempfile

from tidecli.decode.settings import DecodeSettings
from tidecli.model.config import load_config
from tidecli.model.presets import PRESETS
from tidecli.model.synth import write_checkpoint
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options

HANDOFF_LAYERS = 12  # layers of the tiny model (the first dense): enough to average over
HANDOFF_PROMPT = "Count from one to twenty, one number per line."
SLOT_SHARE = 0.5  # of each layer's experts in a slot: ≈ 5 % of the tiny model's pairs miss, as
# in tide's runs of full-size mini at 6-10 GiB on an H200 (2.5-6 %, docs/benchmarks.md)
HANDOFF_MODES = ("cpu", "gpu")  # split is costed as their mean (planner/costs.py)
# the routing width of the LLaDA2 family (mini and flash alike: 256 experts, 8 per token, in 8
# groups of which 4 are kept); the host's work per layer follows the routed pairs and experts,
# not the weights' size
FAMILY_ROUTING = {k: PRESETS["mini"][k]
                  for k in ("num_experts", "num_experts_per_tok", "n_group", "topk_group")}


def _median_forward_ms(engine: Engine, ids: list[int], gen_length: int) -> float:
    warm = DecodeSettings(gen_length=engine.opts.workload.block_length)
    for _ in engine.decoder(ids, warm).steps():  # programs captured, kernels chosen
        pass
    times = [ev.forward_ms for ev in engine.decoder(ids, DecodeSettings(gen_length=gen_length)
                                                    ).steps()]
    return statistics.median(times)


def _forward_ms(path, device: str, policy: str, misses: str, budget: int | None,
                gen_length: int) -> tuple[float, int, float]:
    """Median ms per forward, MoE layers, and the run's hit rate."""
    opts = engine_options(model=str(path), device=device, policy=policy, misses=misses, tau=1,
                          experts_per_layer=budget)
    engine = Engine(opts, quiet=True)
    try:
        ids = engine.prompt_ids(HANDOFF_PROMPT)
        # the least of two medians: a noisy neighbour inflates, never deflates
        ms = min(_median_forward_ms(engine, ids, gen_length) for _ in range(2))
        hit = float(engine.runtime.run_stats.summary()["hit_rate"])
        return ms, engine.cfg.num_moe_layers, hit
    finally:
        engine.close()


def measure_host_layer_ms(device: str = "cuda", *, gen_length: int = 64,
                          routing: dict | None = None,
                          hit_rates: dict[str, float] | None = None) -> dict[str, float]:
    """Miss mode → ms per MoE layer that the host-driven runtime adds to a step on `device`
    (≥ 0), with about 5 % of the routed pairs missing. `routing`: config keys that replace the
    tiny model's routing width (e.g. FAMILY_ROUTING); `hit_rates` receives each mode's."""
    with tempfile.TemporaryDirectory(prefix="tide-handoff-") as tmp:
        path = write_checkpoint(tmp, preset="tiny", device=device,
                                overrides={"num_hidden_layers": HANDOFF_LAYERS, **(routing or {})})
        budget = int(load_config(path).num_experts * SLOT_SHARE)
        base, layers, _ = _forward_ms(path, device, "resident", "auto", None, gen_length)
        out = {}
        for mode in HANDOFF_MODES:
            ms, _, hit = _forward_ms(path, device, "tide", mode, budget, gen_length)
            out[mode] = max(0.0, ms - base) / layers
            if hit_rates is not None:
                hit_rates[mode] = hit
        return out
