"""Memory accounting, once, for the runtime and the planner alike.

Device memory: what tide allocates on the GPU besides routed experts (dense weights, the KV
cache, a workspace for activations and logits) and how many expert slots the rest holds; the CUDA
context is outside the budget. Host memory: how the routed experts share a RAM budget (all in
RAM when they fit, else a staging ring plus as many per layer as fit, the rest read from disk).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from tidecli.errors import TideError
from tidecli.model.config import ModelConfig
from tidecli.units import GIB

# ---- device memory ------------------------------------------------------------------------------


def device_dense_bytes(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Dense weights on the device: everything but routed experts and the embedding table
    (which stays on the host; a step reads 32 of its rows). Routers are kept in fp32."""
    h = cfg.hidden_size
    total = cfg.dense_params() - cfg.vocab_size * h  # the embedding table stays on the host
    if cfg.tie_word_embeddings:
        total += cfg.vocab_size * h  # lm_head is then a device copy of the table
    router = cfg.num_moe_layers * (cfg.num_experts * h + cfg.num_experts)
    return (total - router) * dtype_bytes + router * 4


def workspace_bytes(cfg: ModelConfig, block_length: int = 32) -> int:
    """Activations of one block step plus fp32 logits and their softmax, with headroom."""
    logits = 3 * block_length * cfg.vocab_size * 4
    acts = 64 * block_length * max(cfg.hidden_size, cfg.intermediate_size) * 4
    return logits + acts + (64 << 20)


def pool_bytes(budgets: Iterable[int], expert_bytes: int) -> int:
    """Bytes of the per-layer slot pools for these budgets (the runtime allocates at least one
    row per pool, even for B = 0)."""
    return sum(max(int(b), 1) for b in budgets) * expert_bytes


@dataclass(frozen=True)
class DeviceMemory:
    """A VRAM budget split: the fixed part, and the expert slots the rest holds."""

    budget: int
    dense: int
    kv_cache: int
    workspace: int
    expert_bytes: int  # one routed expert in the device dtype
    num_experts: int
    num_moe_layers: int

    @property
    def fixed(self) -> int:
        return self.dense + self.kv_cache + self.workspace

    @property
    def slots(self) -> int:
        """Expert slots in all (at most every expert of every layer)."""
        room = max(0, self.budget - self.fixed)
        return int(min(self.num_experts * self.num_moe_layers, room // self.expert_bytes))

    @property
    def experts_per_layer(self) -> int:
        """The same number of slots for every MoE layer."""
        return self.uniform_slots()

    def expert_slots(self, reserved: int = 0) -> int:
        """Slots left for experts once `reserved` are kept for another use (the scratch slots,
        shared by every layer, that misses computed on the GPU pass through)."""
        return max(0, self.slots - reserved)

    def uniform_slots(self, reserved: int = 0) -> int:
        """The same number of expert slots for every MoE layer, `reserved` kept aside. The
        runtime and the planner both count with this."""
        if not self.num_moe_layers:
            return 0
        return min(self.num_experts, self.expert_slots(reserved) // self.num_moe_layers)

    def slot_bytes(self, budgets: dict[int, int]) -> int:
        return pool_bytes(budgets.values(), self.expert_bytes)

    def check_budgets(self, budgets: dict[int, int], vram_gib: float) -> None:
        need, room = self.slot_bytes(budgets), self.budget - self.fixed
        if need > room:
            raise TideError(f"the per-layer expert budgets need {need / GIB:.2f} GiB; --vram "
                            f"{vram_gib:g} GiB leaves {room / GIB:.2f} GiB",
                            "lower the budgets or raise --vram")

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "dense_bytes": self.dense,
                "kv_cache_bytes": self.kv_cache, "workspace_bytes": self.workspace,
                "expert_bytes": self.expert_bytes, "experts_per_layer": self.experts_per_layer}


def check_vram_gib(vram_gib: float) -> None:
    if not 0 < vram_gib < float("inf"):  # also refuses nan
        raise TideError(f"--vram must be a positive number of GiB, got {vram_gib:g}",
                        "e.g. --vram 12")


def device_memory(cfg: ModelConfig, vram_gib: float, *, context_tokens: int = 4096,
                  block_length: int = 32, dtype_bytes: int = 2,
                  expert_bytes: int | None = None) -> DeviceMemory:
    """Split `vram_gib`; refuses a budget that cannot hold the dense part and one expert slot
    per MoE layer. `expert_bytes`: one expert slot when the experts are compressed (default:
    `dtype_bytes` per weight)."""
    check_vram_gib(vram_gib)
    mem = DeviceMemory(budget=int(vram_gib * GIB), dense=device_dense_bytes(cfg, dtype_bytes),
                       kv_cache=cfg.kv_bytes_per_token(dtype_bytes) * context_tokens,
                       workspace=workspace_bytes(cfg, block_length),
                       expert_bytes=expert_bytes or cfg.expert_bytes(dtype_bytes),
                       num_experts=cfg.num_experts,
                       num_moe_layers=cfg.num_moe_layers)
    minimum = mem.fixed + cfg.num_moe_layers * mem.expert_bytes
    if minimum > mem.budget:
        raise TideError(
            f"--vram {vram_gib:g} GiB cannot hold the dense part of the model: dense weights "
            f"{mem.dense / GIB:.2f} + KV cache {mem.kv_cache / GIB:.2f} ({context_tokens} "
            f"tokens) + workspace {mem.workspace / GIB:.2f} + one expert slot per layer "
            f"{cfg.num_moe_layers * mem.expert_bytes / GIB:.2f} = {minimum / GIB:.2f} GiB",
            f"give at least {minimum / GIB + 0.05:.2f} GiB, or a shorter --context")
    return mem


# ---- host memory --------------------------------------------------------------------------------

RAM_MARGIN = 2 << 30  # keep this much RAM free for the OS, the page cache and Python
HOST_OVERHEAD_BYTES = 1 << 30  # process, Python, torch, tokenizer beside the expert store
DEFAULT_STAGING_EXPERTS = 16  # pinned buffers experts read from disk pass through
MIN_STAGING_EXPERTS = 2  # one being read while the other is used


@dataclass(frozen=True)
class HostPlan:
    """Where routed experts live on the host: `ram_per_layer[ℓ]` experts of layer ℓ in (pinned)
    RAM, the others in the checkpoint's files, read through `staging_experts` reusable buffers.
    `budget` is the RAM the host expert store may hold (RAM tier + staging ring)."""

    budget: int
    expert_bytes: int
    num_experts: int
    ram_per_layer: dict[int, int]
    staging_experts: int

    @property
    def tiered(self) -> bool:
        return self.disk_experts > 0

    @property
    def ram_experts(self) -> int:
        return sum(self.ram_per_layer.values())

    @property
    def disk_experts(self) -> int:
        return self.num_experts * len(self.ram_per_layer) - self.ram_experts

    @property
    def ram_bytes(self) -> int:
        return self.ram_experts * self.expert_bytes

    @property
    def staging_bytes(self) -> int:
        return self.staging_experts * self.expert_bytes

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "ram_experts": self.ram_experts,
                "disk_experts": self.disk_experts, "staging_experts": self.staging_experts,
                "ram_bytes": self.ram_bytes, "staging_bytes": self.staging_bytes,
                "ram_per_layer": {str(k): v for k, v in self.ram_per_layer.items()}}


def spread(total: int, layers: list[int], cap: int) -> dict[int, int]:
    """`total` items over `layers` as evenly as possible (the first layers take the remainder),
    at most `cap` each."""
    total = min(total, cap * len(layers))
    base, extra = divmod(total, max(1, len(layers)))
    return {layer: base + (1 if j < extra else 0) for j, layer in enumerate(layers)}


def host_tiers(cfg: ModelConfig, budget: int, *, dtype_bytes: int = 2,
               staging_experts: int | None = None,
               ram_per_layer: dict[int, int] | None = None,
               expert_bytes: int | None = None) -> HostPlan:
    """Fit the routed experts into `budget` bytes of host RAM: all of them when they fit, else a
    staging ring (`staging_experts`, default 16, at most a quarter of the budget) and as many
    experts per layer as the rest holds (uniform unless `ram_per_layer` is given).
    `expert_bytes`: one expert when the experts are compressed."""
    eb, e, layers = expert_bytes or cfg.expert_bytes(dtype_bytes), cfg.num_experts, \
        list(cfg.moe_layers)
    if e * len(layers) * eb <= budget:
        return HostPlan(budget, eb, e, {layer: e for layer in layers}, 0)
    if budget < MIN_STAGING_EXPERTS * eb:
        raise TideError(
            f"the routed experts need {e * len(layers) * eb / GIB:.1f} GiB of RAM and "
            f"{budget / GIB:.2f} GiB is not even enough to stage {MIN_STAGING_EXPERTS} experts "
            f"read from disk ({eb / 2**20:.1f} MiB each)",
            "give more RAM (--ram GiB), or close other programs")
    if staging_experts is not None:  # the caller's size, within the budget
        ring = max(MIN_STAGING_EXPERTS, min(staging_experts, budget // eb))
    else:
        ring = max(MIN_STAGING_EXPERTS, min(DEFAULT_STAGING_EXPERTS, budget // (4 * eb)))
    room = (budget - ring * eb) // eb
    if ram_per_layer is not None:
        counts = {layer: int(ram_per_layer[layer]) for layer in layers}
        if any(not 0 <= v <= e for v in counts.values()) or sum(counts.values()) > room:
            raise TideError(f"the experts kept in RAM per layer do not fit ({room} in all, each "
                            f"in 0..{e})", "make the plan again with this --ram")
    else:
        counts = spread(room, layers, e)
    return HostPlan(budget, eb, e, counts, ring)


def available_ram() -> int:
    return int(psutil.virtual_memory().available)


def check_fits_ram(need: int, *, have: int | None = None) -> None:
    """Refuse to hold `need` bytes of experts in RAM when fewer are available (with the margin
    kept free)."""
    have = available_ram() if have is None else have
    if need + RAM_MARGIN > have:
        raise TideError(
            f"the routed experts need {need / GIB:.1f} GiB of RAM (+{RAM_MARGIN >> 30} GiB "
            f"headroom) but only {have / GIB:.1f} GiB is available",
            "close other programs, or let the experts that do not fit stay on disk (--ram GiB)")


def host_embedding_bytes(cfg: ModelConfig) -> int:
    """The embedding table stays in host RAM in bf16 (a step reads a block's rows of it)."""
    return cfg.vocab_size * cfg.hidden_size * 2


def ram_for_experts(available: int, *, given_gib: float | None) -> int:
    """Bytes of RAM for the expert store on this machine: `--ram` (checked against what is
    available), else what is available minus the margin."""
    have = available - RAM_MARGIN
    if given_gib is None:
        return max(0, have)
    check_ram_gib(given_gib)
    budget = int(given_gib * GIB)
    if budget > have:
        raise TideError(f"--ram {given_gib:g} GiB is more than the {max(0, have) / GIB:.1f} GiB "
                        f"of RAM available (keeping {RAM_MARGIN / GIB:.0f} GiB free)",
                        "lower --ram")
    return budget


def check_ram_gib(ram_gib: float) -> None:
    if not 0 < ram_gib < float("inf"):  # also refuses nan
        raise TideError(f"--ram must be positive, got {ram_gib:g}", "e.g. --ram 48")


def profile_ram_for_experts(cfg: ModelConfig, *, available: int, total: int,
                            given_gib: float | None) -> tuple[int | None, str | None]:
    """Bytes of RAM for the expert store on a profiled machine (the planner's figure), and a
    note saying where it comes from; None when neither `--ram` nor the profile tells."""
    if given_gib is not None:
        check_ram_gib(given_gib)
        return int(given_gib * GIB), None
    have, what = available, "available"
    if not have and total:
        have, what = int(total * 0.85), "85 % of the total"
    if not have:
        return None, ("no RAM figure in the profile and no --ram: every expert is assumed to "
                      "fit in host RAM")
    embed = host_embedding_bytes(cfg)
    budget = max(0, have - RAM_MARGIN - embed - HOST_OVERHEAD_BYTES)
    return budget, (f"RAM for experts {budget / GIB:.1f} GiB = {have / GIB:.1f} GiB {what} in "
                    f"the profile − {RAM_MARGIN / GIB:.0f} GiB kept free − "
                    f"{embed / GIB:.2f} GiB embedding table − "
                    f"{HOST_OVERHEAD_BYTES / GIB:.0f} GiB for the process (--ram sets it)")
