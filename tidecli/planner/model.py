"""The cost model: the paper's τ program and the predicted time of one denoising step.

τ program (TIDE, per MoE layer ℓ and block of T steps, summed over layers):
    I/O(τ) = C_IO · (B·T/τ) · [1 − (1 − d)^τ]        CPU(τ) = C_CPU · T · B · f(τ)
    τ* = argmin over τ ∈ {1..T−1}, by exhaustive evaluation.
Here f(τ) is the expected number of missed (token, expert) pairs per step *per slot* under a
refresh every τ steps, so B·f(τ) is the missed pairs per step; C_CPU is per missed pair, at the
tokens a missed expert's call carries under that τ (RoutingStats.miss_tokens_per_call).

Step time (what `predict` returns): dense part + Σ_ℓ max(GPU hits, CPU misses) — the runtime
computes a layer's misses on the host while the GPU computes its resident experts — plus the
part of each refresh's copies that does not fit under one step's compute (copies are async).
With a disk tier (`Problem.ram`: experts per layer kept in RAM), missed experts outside RAM are
read first, by reader threads alongside the CPU work: the host side of a layer then takes
max(CPU misses, disk reads).

Streamed misses (`MissMode.STREAM`, experts/stream.py): the GPU reads each missed expert from
pinned RAM itself, inside the step, at C_IO; on a refresh step it keeps it in a slot (the read
*is* the promotion), between refreshes it reads it again. Nothing overlaps it, so a layer costs
GPU hits + missed experts · C_IO, and the τ program is the block's streamed reads: misses only
grow with τ, so τ = 1 wins whenever streaming applies.

Host-driven modes (`CPU`, `SPLIT`, `GPU`, any disk tier) hand every MoE layer to the host: the
step is replayed in pieces and the host reads each layer's routing before its misses can start,
a cost per MoE layer beyond the misses' compute and copies (`host_ms`, the profile's measured
hand-off for the mode) that streamed misses and the all-resident step, one device program each,
do not pay.

Misses through GPU scratch slots (`GPU`): each missed expert is copied (C_IO) and computed by the
GPU after the resident experts. `SPLIT` (experts/misses.py): the runtime sends the GPU the share
of a layer's missed experts that balances their copies against the CPU's work on the rest, and
both sides run at once. Both are modelled as the runtime places them (`layer_expert_time`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tidecli.experts.modes import MissMode
from tidecli.model.config import ModelConfig
from tidecli.planner.costs import HardwareCosts
from tidecli.planner.stats import RoutingStats


@dataclass(frozen=True, eq=False)
class Problem:
    cfg: ModelConfig
    costs: HardwareCosts
    stats: RoutingStats
    steps: int  # T: denoising steps per block
    ram: np.ndarray | None = None  # [L] experts per layer kept in host RAM; None → all of them
    misses: MissMode = MissMode.CPU  # where misses run (never AUTO: resolved before planning)

    @property
    def streamed(self) -> bool:
        return self.misses is MissMode.STREAM


@dataclass(frozen=True)
class Breakdown:
    """Predicted milliseconds of one denoising step (averaged over a block's steps)."""

    gpu_dense_ms: float  # dense weights + KV read, kernel launches
    gpu_expert_ms: float  # resident experts used by the step
    cpu_miss_ms: float  # host work on missed pairs (mostly hidden under gpu_expert_ms)
    cpu_stall_ms: float  # the part of cpu_miss_ms the GPU waits for
    pcie_ms: float  # promotions copied host → GPU, per step
    pcie_stall_ms: float  # the part of pcie_ms that does not fit under the step's compute
    hit_rate: float = 1.0  # share of routed pairs computed by resident experts
    promotions_per_step: float = 0.0
    disk_ms: float = 0.0  # reading missed experts that live on disk (overlaps the CPU work)
    disk_stall_ms: float = 0.0  # the part of disk_ms the GPU waits for beyond the CPU stall
    disk_reads_per_step: float = 0.0
    scratch_ms: float = 0.0  # GPU time on misses through scratch slots (copies + compute)
    host_ms: float = 0.0  # the MoE layers' hand-offs to the host (host-driven runtime)
    io_expert_ms: float = 0.0  # one expert copied host → GPU (the per-expert term of pcie_ms)

    @property
    def stall_ms(self) -> float:
        return (self.cpu_stall_ms + self.pcie_stall_ms + self.disk_stall_ms + self.scratch_ms
                + self.host_ms)

    @property
    def step_ms(self) -> float:
        return self.gpu_dense_ms + self.gpu_expert_ms + self.stall_ms

    def to_dict(self) -> dict:
        r = 4
        return {"gpu_dense_ms": round(self.gpu_dense_ms, r),
                "gpu_expert_ms": round(self.gpu_expert_ms, r),
                "cpu_miss_ms": round(self.cpu_miss_ms, r),
                "cpu_stall_ms": round(self.cpu_stall_ms, r),
                "pcie_ms": round(self.pcie_ms, r), "pcie_stall_ms": round(self.pcie_stall_ms, r),
                "stall_ms": round(self.stall_ms, r), "step_ms": round(self.step_ms, r),
                "hit_rate": round(self.hit_rate, 4),
                "promotions_per_step": round(self.promotions_per_step, 3),
                "disk_ms": round(self.disk_ms, r), "disk_stall_ms": round(self.disk_stall_ms, r),
                "disk_reads_per_step": round(self.disk_reads_per_step, 3),
                "scratch_ms": round(self.scratch_ms, r), "host_ms": round(self.host_ms, r),
                "io_expert_ms": round(self.io_expert_ms, r)}


# ---- the paper's program ------------------------------------------------------------------------


def io_cost(*, c_io_ms: float, experts: float, steps: int, tau: int, drift: float) -> float:
    """I/O latency of one block: T/τ refreshes, each copying the B·[1 − (1 − d)^τ] that drifted."""
    return c_io_ms * (experts * steps / tau) * (1.0 - (1.0 - drift) ** tau)


def cpu_cost(*, c_cpu_ms: float, steps: int, experts: float, f: float) -> float:
    """CPU latency of one block: T steps of B·f(τ) missed pairs at C_CPU each."""
    return c_cpu_ms * steps * experts * f


def _pick(a: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    return a[np.arange(len(budgets)), budgets]


def _per_layer(p: Problem, budgets: np.ndarray, tau: int) -> dict[str, np.ndarray]:
    st, co = p.stats, p.costs
    mp, me = st.block_mean_miss(tau, p.steps)
    return {"miss_pairs": _pick(mp, budgets), "miss_experts": _pick(me, budgets),
            "drift": _pick(st.drift, budgets),
            "c_cpu": np.asarray(co.c_cpu_ms(_pick(st.tokens_per_missed_call(mp, me), budgets)))}


def disk_share(p: Problem) -> np.ndarray:
    """[L] share of a layer's missed experts that live on disk (0 without a disk tier)."""
    if p.ram is None:
        return np.zeros(p.stats.num_layers)
    return 1.0 - p.stats.ram_share(p.ram)


def layer_time(gpu, cpu, disk, overlap: bool):
    """A layer's expert time: GPU hits beside the host's misses (CPU work beside disk reads)."""
    host = np.maximum(cpu, disk)
    return np.maximum(gpu, host) if overlap else gpu + host


def gpu_share(p: Problem, experts, cpu):
    """Missed experts the runtime sends through scratch slots: all of them (`GPU`), none
    (`CPU`), or for `SPLIT` the share k with k·C_IO = (n − k)·(CPU time per expert)."""
    if p.misses is MissMode.GPU:
        return np.asarray(experts, dtype=np.float64)
    if p.misses is not MissMode.SPLIT:
        return np.zeros_like(np.asarray(experts, dtype=np.float64))
    per_expert = np.where(experts > 0, cpu / np.maximum(experts, 1e-9), 0.0)
    return experts * per_expert / (p.costs.c_io_ms + per_expert + 1e-12)


def layer_expert_time(p: Problem, gpu, experts, cpu, disk):
    """A layer's expert time per step, its misses placed as the runtime places them (not for
    streamed misses): `gpu` the resident experts' time, `experts` the missed experts, `cpu` the
    host time for all missed pairs, `disk` the reads of missed experts outside RAM. Returns
    (layer time, GPU time on scratch slots, CPU time)."""
    co = p.costs
    k = gpu_share(p, experts, cpu)
    scratch = k * (co.c_io_ms + co.gpu_expert_ms)  # copied, then computed after the hits
    host = np.where(experts > 0, cpu * (experts - k) / np.maximum(experts, 1e-9), 0.0)
    return layer_time(gpu + scratch, host, disk, co.overlap), scratch, host


def tau_objective(p: Problem, budgets: np.ndarray, tau: int) -> float:
    """Σ_ℓ I/O_ℓ(τ) + CPU_ℓ(τ), milliseconds per block; with a disk tier the reads of missed
    experts outside RAM are added to the CPU term."""
    v = _per_layer(p, budgets, tau)
    if p.streamed:
        return float((p.stats.distinct * v["miss_experts"]).sum()) * p.steps * p.costs.c_io_ms
    if p.misses is not MissMode.CPU:  # refresh copies + the time misses add to each step
        st, co = p.stats, p.costs
        gpu = st.distinct * (1 - v["miss_experts"]) * co.gpu_expert_ms
        experts = st.distinct * v["miss_experts"]
        disk = experts * disk_share(p) * co.disk_expert_ms
        layer, _s, _h = layer_expert_time(p, gpu, experts,
                                          st.pairs * v["miss_pairs"] * v["c_cpu"], disk)
        io = sum(io_cost(c_io_ms=co.c_io_ms, experts=b, steps=p.steps, tau=tau,
                         drift=float(v["drift"][j])) for j, b in enumerate(budgets.tolist()))
        return io + float((layer - gpu).sum()) * p.steps
    total = 0.0
    reads = p.stats.distinct * v["miss_experts"] * disk_share(p)  # disk reads per step
    total += float(reads.sum()) * p.steps * p.costs.disk_expert_ms
    for j, b in enumerate(budgets.tolist()):
        slots = max(b, 1)  # f is per slot; a layer without slots still pays its misses
        f = v["miss_pairs"][j] * p.stats.pairs / slots
        total += io_cost(c_io_ms=p.costs.c_io_ms, experts=b, steps=p.steps, tau=tau,
                         drift=float(v["drift"][j]))
        total += cpu_cost(c_cpu_ms=float(v["c_cpu"][j]), steps=p.steps, experts=slots, f=f)
    return total


def solve_tau(p: Problem, budgets: np.ndarray) -> tuple[int, tuple[float, ...]]:
    """τ* and the objective for every τ in 1..T−1 (ties go to the smaller τ)."""
    costs = tuple(tau_objective(p, budgets, tau) for tau in range(1, p.steps))
    return int(np.argmin(costs)) + 1, costs


# ---- step time ----------------------------------------------------------------------------------


def layer_step_costs(p: Problem, tau: int) -> np.ndarray:
    """[L, E+1]: per layer and budget, that layer's expert time per step plus its copies as if
    exposed — the additive objective the per-layer allocation minimises."""
    st, co = p.stats, p.costs
    mp, me = st.block_mean_miss(tau, p.steps)
    gpu = st.distinct[:, None] * (1 - me) * co.gpu_expert_ms
    if p.streamed:
        return gpu + st.distinct[:, None] * me * co.c_io_ms
    cpu = st.pairs * mp * co.c_cpu_ms(st.tokens_per_missed_call(mp, me))
    experts = st.distinct[:, None] * me
    disk = experts * disk_share(p)[:, None] * co.disk_expert_ms
    layer = layer_expert_time(p, gpu, experts, cpu, disk)[0]
    b = np.arange(st.drift.shape[1])[None, :]
    io = co.c_io_ms * b * (1 - (1 - st.drift) ** tau) / tau
    return layer + io


def predict(p: Problem, budgets: np.ndarray, tau: int) -> Breakdown:
    co, st = p.costs, p.stats
    v = _per_layer(p, budgets, tau)
    gpu = st.distinct * (1 - v["miss_experts"]) * co.gpu_expert_ms
    if p.streamed:
        read = st.distinct * v["miss_experts"]  # experts per layer and step, over PCIe
        stream_ms = float(read.sum()) * co.c_io_ms
        kept = float(read.sum()) if tau == 1 else float(read.sum()) / tau  # refresh steps keep
        return Breakdown(
            gpu_dense_ms=co.dense_ms, gpu_expert_ms=float(gpu.sum()), cpu_miss_ms=0.0,
            cpu_stall_ms=0.0, pcie_ms=stream_ms, pcie_stall_ms=stream_ms,
            hit_rate=float(1 - v["miss_pairs"].mean()), promotions_per_step=kept,
            io_expert_ms=co.c_io_ms)
    experts = st.distinct * v["miss_experts"]  # missed experts per layer and step
    cpu_all = st.pairs * v["miss_pairs"] * v["c_cpu"]
    reads = experts * disk_share(p)
    base, _scratch, cpu = layer_expert_time(p, gpu, experts, cpu_all, 0.0)
    layer = layer_expert_time(p, gpu, experts, cpu_all, reads * co.disk_expert_ms)[0]
    compute = co.dense_ms + float(layer.sum())
    promoted = budgets * (1 - (1 - v["drift"]) ** tau)  # per refresh, per layer
    io_refresh = co.c_io_ms * float(promoted.sum())
    pcie = io_refresh / tau
    # copies start after a layer's refresh compute and must land before the next step reaches
    # that layer: about one step of compute hides them (none on a CPU device: copies are sync)
    pcie_stall = max(0.0, io_refresh - compute) / tau if co.overlap else pcie
    copies = float((gpu_share(p, experts, cpu_all) * co.c_io_ms).sum())  # into scratch slots
    miss_stall = float((base - gpu).sum())
    on_cpu = p.misses is MissMode.CPU
    return Breakdown(
        gpu_dense_ms=co.dense_ms, gpu_expert_ms=float(gpu.sum()), cpu_miss_ms=float(cpu.sum()),
        cpu_stall_ms=miss_stall if on_cpu else 0.0, pcie_ms=pcie + copies,
        pcie_stall_ms=pcie_stall, hit_rate=float(1 - v["miss_pairs"].mean()),
        promotions_per_step=float(promoted.sum()) / tau,
        disk_ms=float(reads.sum()) * co.disk_expert_ms,
        disk_stall_ms=float((layer - base).sum()), disk_reads_per_step=float(reads.sum()),
        scratch_ms=0.0 if on_cpu else miss_stall,
        host_ms=p.cfg.num_moe_layers * co.host_ms(str(p.misses)), io_expert_ms=co.c_io_ms)


def ram_step_costs(p: Problem, budgets: np.ndarray, tau: int) -> np.ndarray:
    """[L, E+1]: per layer and count R of experts kept in RAM, that layer's expert time per step
    (what the split of the RAM budget over layers minimises)."""
    st, co = p.stats, p.costs
    v = _per_layer(p, budgets, tau)
    e = st.miss_pairs.shape[2] - 1
    r = np.arange(e + 1)
    if st.ram_cover is None:
        share = np.broadcast_to(r / e, (st.num_layers, e + 1))
    else:
        share = st.ram_cover
    gpu = (st.distinct * (1 - v["miss_experts"]) * co.gpu_expert_ms)[:, None]
    cpu = (st.pairs * v["miss_pairs"] * v["c_cpu"])[:, None]
    experts = (st.distinct * v["miss_experts"])[:, None]
    disk = experts * (1 - share) * co.disk_expert_ms
    return layer_expert_time(p, gpu, experts, cpu, disk)[0]
