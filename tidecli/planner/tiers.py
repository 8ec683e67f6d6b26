"""The host tiers of a plan: the RAM the routed experts get, how many per layer stay in RAM, and
what is left on disk (read when missed).

The accounting is memory.py's, the runtime's own, so plan and runtime agree.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tidecli.hardware.profile import HardwareProfile
from tidecli.memory import HostPlan, host_tiers, profile_ram_for_experts
from tidecli.model.config import ModelConfig
from tidecli.planner.allocate import allocate_slots
from tidecli.planner.model import Problem, predict, ram_step_costs, solve_tau

NON_UNIFORM_GAIN = 0.01  # per-layer RAM counts must beat uniform by this share to be chosen


def ram_budget(cfg: ModelConfig, profile: HardwareProfile,
               ram_gib: float | None) -> tuple[int | None, str | None]:
    """Bytes of host RAM for the expert store (experts kept in RAM + staging ring), and a note
    saying where the figure comes from. None when neither --ram nor the profile tells."""
    return profile_ram_for_experts(cfg, available=profile.ram_available_bytes,
                                   total=profile.ram_total_bytes, given_gib=ram_gib)


def plan_host(cfg: ModelConfig, budget: int | None, dtype_bytes: int = 2,
              expert_bytes: int | None = None) -> HostPlan | None:
    """The runtime's split of `budget` (None: everything in RAM, budget unknown);
    `expert_bytes`: one compressed expert."""
    if budget is None:
        return None
    return host_tiers(cfg, budget, dtype_bytes=dtype_bytes, expert_bytes=expert_bytes)
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
    per_layer = allocate_slots(ram_step_costs(p, budgets, tau), total)
    step = predict(_with(p, per_layer), budgets, solve_tau(_with(p, per_layer), budgets)[0])
    alternatives["ram_per_layer"] = step.step_ms
    if step.step_ms < base * (1 - NON_UNIFORM_GAIN):
        return per_layer, alternatives
    return uniform, alternatives


def _with(p: Problem, ram: np.ndarray) -> Problem:
    return replace(p, ram=ram)
