"""The host tiers of a plan: the RAM the routed experts get, how many per layer stay in RAM, and
what is left on disk (read when missed).

The accounting is experts/budget.py's `host_tiers`, the engine's own, so plan and engine agree.
"""

from __future__ import annotations

import numpy as np

from tidecli.errors import TideError
from tidecli.experts.budget import GIB, RAM_MARGIN, HostPlan, host_tiers
from tidecli.hardware.profile import HardwareProfile
from tidecli.model.config import ModelConfig
from tidecli.planner.model import Problem, predict, ram_step_costs, solve_tau

HOST_OVERHEAD_BYTES = 1 << 30  # process, Python, torch, tokenizer beside the expert store
NON_UNIFORM_GAIN = 0.01  # per-layer RAM counts must beat uniform by this share to be chosen


def host_embedding_bytes(cfg: ModelConfig) -> int:
    """The embedding table stays in host RAM in bf16 (a step reads a block's rows of it)."""
    return cfg.vocab_size * cfg.hidden_size * 2


def ram_budget(cfg: ModelConfig, profile: HardwareProfile,
               ram_gib: float | None) -> tuple[int | None, str | None]:
    """Bytes of host RAM for the expert store (experts kept in RAM + staging ring), and a note
    saying where the figure comes from. None when neither --ram nor the profile tells."""
    if ram_gib is not None:
        if ram_gib <= 0:
            raise TideError(f"--ram must be positive, got {ram_gib:g}", "e.g. --ram 48")
        return int(ram_gib * GIB), None
    have = profile.ram_available_bytes
    what = "available"
    if not have and profile.ram_total_bytes:
        have, what = int(profile.ram_total_bytes * 0.85), "85 % of the total"
    if not have:
        return None, ("no RAM figure in the profile and no --ram: every expert is assumed to "
                      "fit in host RAM")
    embed = host_embedding_bytes(cfg)
    budget = max(0, have - RAM_MARGIN - embed - HOST_OVERHEAD_BYTES)
    return budget, (f"RAM for experts {budget / GIB:.1f} GiB = {have / GIB:.1f} GiB {what} in "
                    f"the profile − {RAM_MARGIN / GIB:.0f} GiB kept free − "
                    f"{embed / GIB:.2f} GiB embedding table − "
                    f"{HOST_OVERHEAD_BYTES / GIB:.0f} GiB for the process (--ram sets it)")


def plan_host(cfg: ModelConfig, budget: int | None) -> HostPlan | None:
    """The engine's split of `budget` (None: everything in RAM, budget unknown)."""
    if budget is None:
        return None
    return host_tiers(cfg, budget)


def split_ram(p: Problem, budgets: np.ndarray, tau: int,
              host: HostPlan) -> tuple[np.ndarray, dict[str, float]]:
    """Experts per layer to keep in RAM: uniform, or — with a routing trace, whose layers
    differ — the exact split of the same total that minimises Σ_ℓ layer time (dynamic
    programme), kept when predicted ≥ 1 % faster. Returns the counts and both predictions."""
    layers = list(host.ram_per_layer)
    uniform = np.array([host.ram_per_layer[layer] for layer in layers], dtype=np.int64)
    base = predict(_with(p, uniform), budgets, tau).step_ms
    alternatives = {"ram_uniform": base}
    total = int(uniform.sum())
    if p.stats.ram_cover is None or total < len(layers):
        return uniform, alternatives
    from tidecli.planner.solver import allocate_slots

    per_layer = allocate_slots(ram_step_costs(p, budgets, tau), total)
    step = predict(_with(p, per_layer), budgets, solve_tau(_with(p, per_layer), budgets)[0])
    alternatives["ram_per_layer"] = step.step_ms
    if step.step_ms < base * (1 - NON_UNIFORM_GAIN):
        return per_layer, alternatives
    return uniform, alternatives


def _with(p: Problem, ram: np.ndarray) -> Problem:
    return Problem(cfg=p.cfg, costs=p.costs, stats=p.stats, steps=p.steps, ram=ram)
