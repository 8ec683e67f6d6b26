"""What an expert runtime reports, as plain data: counters per forward pass and MoE layer, summed
per step and per run. Part of the seam (model/moe.py): the decoder, the UI and the benchmarks read
them without knowing the runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerCounters:
    gpu_hits: int = 0  # (token, expert) pairs whose expert was resident when the layer began
    fetched_calls: int = 0  # pairs computed on the GPU after fetching their expert for them
    cpu_calls: int = 0  # (token, expert) pairs computed on the CPU
    promotions: int = 0  # experts copied host → GPU
    bytes_h2d: int = 0  # expert bytes copied host → GPU (or read from host memory by the GPU)
    streamed: int = 0  # experts whose weights the GPU read from host memory without keeping them
    copy_ms: float = 0.0  # time the copies host → GPU took on the copy stream (promotions and
    # misses read into scratch slots; not reads in place, which no counter times)
    cpu_ms: float = 0.0  # CPU time computing misses
    stall_ms: float = 0.0  # time the GPU waited for copies or CPU results
    disk_reads: int = 0  # experts read from the checkpoint's files (tiered store)
    bytes_disk: int = 0
    staging_hits: int = 0  # experts found still staged, not read again
    disk_wait_ms: float = 0.0  # time the host waited for those reads
    prefetched: int = 0  # experts read ahead of their layer's router on a guess
    prefetch_used: int = 0  # of those, the experts the layer's routing then used
    bytes_prefetch_wasted: int = 0  # bytes read ahead for experts the layer did not use

    def add(self, other: LayerCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def pairs(self) -> int:
        return self.gpu_hits + self.fetched_calls + self.cpu_calls

    @property
    def hit_rate(self) -> float:
        """Share of routed pairs whose expert was resident (1 when there were none)."""
        return self.gpu_hits / self.pairs if self.pairs else 1.0

    @property
    def cpu_share(self) -> float:
        return self.cpu_calls / self.pairs if self.pairs else 0.0


@dataclass
class ExpertStats:
    """Counters for one or more forward passes, per MoE layer (keyed by layer index)."""

    layers: dict[int, LayerCounters] = field(default_factory=dict)
    forwards: int = 0
    prefetch_off_forwards: int = 0  # forwards whose read-ahead its gate held off

    def layer(self, i: int) -> LayerCounters:
        c = self.layers.get(i)
        if c is None:
            c = self.layers[i] = LayerCounters()
        return c

    def add(self, other: ExpertStats) -> None:
        self.forwards += other.forwards
        self.prefetch_off_forwards += other.prefetch_off_forwards
        for i, c in other.layers.items():
            self.layer(i).add(c)

    def total(self) -> LayerCounters:
        t = LayerCounters()
        for c in self.layers.values():
            t.add(c)
        return t

    def summary(self) -> dict:
        t = self.total()
        return {
            "forwards": self.forwards,
            "pairs": t.pairs,
            "gpu_hits": t.gpu_hits,
            "fetched_calls": t.fetched_calls,
            "cpu_calls": t.cpu_calls,
            "cpu_share": t.cpu_share,
            "hit_rate": t.hit_rate,
            "promotions": t.promotions,
            "bytes_h2d": t.bytes_h2d,
            "streamed": t.streamed,
            "copy_ms": round(t.copy_ms, 3),
            "cpu_ms": round(t.cpu_ms, 3),
            "stall_ms": round(t.stall_ms, 3),
            "disk_reads": t.disk_reads,
            "bytes_disk": t.bytes_disk,
            "staging_hits": t.staging_hits,
            "disk_wait_ms": round(t.disk_wait_ms, 3),
            "prefetched": t.prefetched,
            "prefetch_used": t.prefetch_used,
            "prefetch_accuracy": t.prefetch_used / t.prefetched if t.prefetched else None,
            "bytes_prefetch_wasted": t.bytes_prefetch_wasted,
            "prefetch_off_forwards": self.prefetch_off_forwards,
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "per_layer": {str(i): asdict(c) for i, c in sorted(self.layers.items())},
        }
