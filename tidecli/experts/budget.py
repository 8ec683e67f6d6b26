"""GPU memory accounting: what must sit on the GPU besides experts, and how many experts fit.

The budget counts what tide allocates on the device (dense weights, KV cache, slot pools, a
workspace for activations and logits); the CUDA context itself is outside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidecli.errors import TideError
from tidecli.model.config import ModelConfig

GIB = 1 << 30


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


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    dense: int
    kv_cache: int
    workspace: int
    expert_bytes: int
    experts_per_layer: int

    @property
    def slots_bytes(self) -> int:
        return self.expert_bytes * self.experts_per_layer

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "dense_bytes": self.dense,
                "kv_cache_bytes": self.kv_cache, "workspace_bytes": self.workspace,
                "expert_bytes": self.expert_bytes, "experts_per_layer": self.experts_per_layer}


def uniform_budget(cfg: ModelConfig, vram_gib: float, *, context_tokens: int = 4096,
                   block_length: int = 32, dtype_bytes: int = 2) -> MemoryPlan:
    """The most experts per MoE layer (same for every layer) that fit `vram_gib`."""
    if not 0 < vram_gib < float("inf"):  # also refuses nan
        raise TideError(f"--vram must be a positive number of GiB, got {vram_gib}",
                        "e.g. --vram 12")
    budget = int(vram_gib * GIB)
    dense = device_dense_bytes(cfg, dtype_bytes)
    kv = cfg.kv_bytes_per_token(dtype_bytes) * context_tokens
    work = workspace_bytes(cfg, block_length)
    fixed = dense + kv + work
    if fixed > budget:
        raise TideError(
            f"--vram {vram_gib:g} GiB cannot hold the dense part of the model: dense weights "
            f"{dense / GIB:.2f} GiB + KV cache {kv / GIB:.2f} GiB + workspace {work / GIB:.2f} GiB"
            f" = {fixed / GIB:.2f} GiB",
            f"give at least {fixed / GIB + 0.5:.1f} GiB")
    per_expert = cfg.expert_bytes(dtype_bytes) * cfg.num_moe_layers
    b = min(cfg.num_experts, (budget - fixed) // per_expert) if cfg.num_moe_layers else 0
    return MemoryPlan(budget, dense, kv, work, cfg.expert_bytes(dtype_bytes), int(b))


# ---- host RAM: experts kept in RAM, the staging ring, the rest on disk --------------------------

RAM_MARGIN = 2 << 30  # keep this much RAM free for the OS, the page cache and Python
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
               ram_per_layer: dict[int, int] | None = None) -> HostPlan:
    """Fit the routed experts into `budget` bytes of host RAM: all of them when they fit, else a
    staging ring (`staging_experts`, default 16, at most a quarter of the budget) and as many
    experts per layer as the rest holds (uniform unless `ram_per_layer` is given)."""
    eb, e, layers = cfg.expert_bytes(dtype_bytes), cfg.num_experts, list(cfg.moe_layers)
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
