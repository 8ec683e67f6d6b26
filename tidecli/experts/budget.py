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
    if vram_gib <= 0:
        raise TideError(f"--vram must be positive, got {vram_gib}", "e.g. --vram 12")
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
