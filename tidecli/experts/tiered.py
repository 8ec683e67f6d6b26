"""The tiered host store, for models whose routed experts do not fit in RAM.

The experts a plan keeps close sit in (pinned) RAM, as in `HostExpertStore`; all others stay in
the checkpoint's safetensors files and are read on demand, at their byte offsets (one positional
read per run of adjacent tensors: gate, up and down of one expert are usually adjacent), into
the staging ring (experts/staging.py), from where they are copied to a GPU slot or computed on
by the CPU workers. Reads run on reader threads: `batches` starts them before it hands out the
rows already in RAM, and keeps two chunks of the ring in flight while the caller works on one.

Host memory held: the RAM tier (fixed at start) plus at most `staging_experts` ring buffers;
`HostPlan` (memory.py) keeps both within the RAM budget. Reads go through the page
cache, which the kernel reclaims when memory is short; it is not part of the process's RSS.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from tidecli.errors import TideError
from tidecli.experts.info import StoreInfo
from tidecli.experts.runtime import read_expert_packed
from tidecli.experts.staging import StagingRing, Tag
from tidecli.experts.store import ExpertBatch, ExpertSource
from tidecli.memory import HostPlan
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.tensorio import ShardReader, check_finite, torch_dtype

Run = tuple[Path, int, list[tuple[int, int]]]  # (file, offset, [(row byte offset, bytes)])


def expert_runs(ckpt: Checkpoint, layer: int, expert: int) -> list[Run]:
    """Where one expert's packed row [gate | up | down] lies in the files, as runs of tensors
    adjacent in one file (each run is one sequential read)."""
    parts, at = [], 0
    for info in ckpt.expert_infos(layer, expert):
        parts.append((info.file, info.begin, at, info.nbytes))
        at += info.nbytes
    parts.sort(key=lambda p: (str(p[0]), p[1]))
    runs: list[Run] = []
    for file, begin, row_off, n in parts:
        if runs and runs[-1][0] == file:
            _file, start, pieces = runs[-1]
            if start + sum(m for _, m in pieces) == begin:
                pieces.append((row_off, n))
                continue
        runs.append((file, begin, [(row_off, n)]))
    return runs


class ShardFiles:
    """Open shard files, read at offsets from any thread (`os.preadv` where the OS has it)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # guards the table, and seek + read where no preadv

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                except OSError as exc:
                    raise TideError(f"cannot open {path}: {exc.strerror or exc}",
                                    "check that the checkpoint folder is readable") from exc
                self._fds[path] = fd
            return fd

    def read(self, path: Path, offset: int, views: list[memoryview]) -> None:
        """Fill `views` with the bytes of `path` from `offset` on (adjacent, in order)."""
        fd = self._fd(path)
        total = sum(len(v) for v in views)
        done = self._readv(fd, views, offset)
        while done < total:  # a short read: finish view by view
            skip, rest = done, []
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                rest.append(v[skip:])
                skip = 0
            n = self._readv(fd, rest[:1], offset + done)
            if n <= 0:
                raise TideError(f"{path.name} ended early while reading an expert",
                                "re-download this shard (it is truncated)")
            done += n

    def _readv(self, fd: int, views: list[memoryview], offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(fd, views, offset)
        with self._lock:  # no positional reads on this OS: one reader at a time
            os.lseek(fd, offset, os.SEEK_SET)
            got = 0
            for v in views:
                n = os.readv(fd, [v]) if hasattr(os, "readv") else _read_into(fd, v)
                got += n
                if n < len(v):
                    break
            return got

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _read_into(fd: int, view: memoryview) -> int:
    data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def choose_ram_experts(counts: dict[int, int], num_experts: int, *,
                       popularity: dict[int, np.ndarray] | None = None,
                       skip: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Which experts of each layer stay in RAM: the `counts[ℓ]` most popular (most used first,
    then lower id) after the `skip[ℓ]` most popular (those a static placement keeps on the GPU
    for good); without popularity, the lowest ids."""
    out = {}
    for layer, n in counts.items():
        if popularity is not None and layer in popularity:
            pop = np.asarray(popularity[layer], dtype=np.float64)
            order = np.lexsort((np.arange(num_experts), -pop)).tolist()
        else:
            order = list(range(num_experts))
        start = min((skip or {}).get(layer, 0), num_experts - n)
        out[layer] = sorted(order[start: start + n])
    return out


class TieredExpertStore(ExpertSource):
    """Experts of `host.ram_per_layer` in RAM, the rest read from the files through a ring of
    `host.staging_experts` buffers by `readers` threads."""

    def __init__(self, ckpt: Checkpoint, host: HostPlan, *, pin: bool,
                 popularity: dict[int, np.ndarray] | None = None,
                 skip: dict[int, int] | None = None, readers: int = 2,
                 check_finite: bool = True, progress: Callable[[int], None] | None = None) -> None:
        cfg = ckpt.config
        t0 = time.perf_counter()
        self.cfg = cfg
        self.ckpt = ckpt
        self.host = host
        self.dtype, self.row = self._row_layout()
        self.expert_bytes = self.row * self.dtype.itemsize
        self.pinned = pin
        self.pin_error = None
        self._check = check_finite
        chosen = choose_ram_experts(host.ram_per_layer, cfg.num_experts, popularity=popularity,
                                    skip=skip)
        self.slot: dict[int, np.ndarray] = {}  # layer → index in the RAM tier, -1 on disk
        self.ram: dict[int, torch.Tensor] = {}  # layer → [R_ℓ, row] (absent when R_ℓ = 0)
        self._checked: dict[int, np.ndarray] = {}
        for layer in cfg.moe_layers:
            slots = np.full(cfg.num_experts, -1, dtype=np.int64)
            slots[chosen[layer]] = np.arange(len(chosen[layer]))
            self.slot[layer] = slots
            self._checked[layer] = slots >= 0
            if chosen[layer]:
                self.ram[layer] = self._alloc((len(chosen[layer]), self.row))
        self._load_ram(chosen, progress)
        self._files = ShardFiles()
        self.ring = StagingRing(host.staging_experts, alloc=lambda: self._alloc((self.row,)),
                                reader=self._read, verify=self._verify, threads=readers)
        tiers = {**host.to_dict(), "readers": self.ring.threads}
        self.info = StoreInfo(host.ram_bytes + host.staging_bytes, self.pinned, self.pin_error,
                              time.perf_counter() - t0, tiers=tiers)

    # ---- reading (a compressed store reads its cache instead: experts/qstore.py) ----------------

    def _row_layout(self) -> tuple[torch.dtype, int]:
        """The rows' dtype and elements per row: the checkpoint's."""
        return torch_dtype(self.ckpt.expert_dtype()), self.cfg.expert_params

    def _load_ram(self, chosen: dict[int, list[int]], progress: Callable[[int], None] | None
                  ) -> None:
        """Fill the RAM tier with the `chosen` experts of each layer."""
        with ShardReader() as reader:
            for layer, experts in chosen.items():
                for j, e in enumerate(experts):
                    read_expert_packed(reader, self.ckpt, layer, e, self.ram[layer][j],
                                       check=self._check)
                    if progress:
                        progress(self.expert_bytes)

    def _read(self, tag: Tag, buf: torch.Tensor) -> None:
        """Reader thread: one expert from the files into a ring buffer."""
        raw = memoryview(buf.view(torch.uint8).numpy())
        for path, offset, pieces in expert_runs(self.ckpt, *tag):
            self._files.read(path, offset, [raw[a: a + n] for a, n in pieces])

    def _verify(self, tag: Tag, buf: torch.Tensor) -> None:
        """First read of an expert: refuse NaN or inf, as the RAM tier was checked at load."""
        layer, e = tag
        if not self._check or self._checked[layer][e]:
            return
        at = 0
        for info in self.ckpt.expert_infos(layer, e):
            n = info.nbytes // buf.element_size()
            check_finite(info.name, buf[at: at + n], shard=info.file.name)
            at += n
        self._checked[layer][e] = True

    def in_ram(self, layer: int, e: int) -> bool:
        return bool(self.slot[layer][e] >= 0)

    @property
    def host_bytes(self) -> int:
        """Host memory this store holds now: the RAM tier and the ring buffers allocated."""
        ram = sum(t.numel() * t.element_size() for t in self.ram.values())
        return ram + self.ring.nbytes

    def batches(self, layer: int, experts: list[int]) -> Iterator[ExpertBatch]:
        """RAM rows first (their disk reads already started), then the disk experts in chunks
        of half the ring: the next chunk is read while the caller works on this one."""
        slot, ring = self.slot[layer], self.ring
        ram = [e for e in experts if slot[e] >= 0]
        disk = [e for e in experts if slot[e] < 0]
        size = max(1, ring.capacity // 2)
        chunks = [disk[i: i + size] for i in range(0, len(disk), size)]
        held: dict[int, list[int]] = {}
        issued = 0
        last_after: object | None = None
        batch: ExpertBatch | None = None

        def issue(upto: int) -> None:
            nonlocal issued
            while issued < min(upto, len(chunks)) and ring.available() >= len(chunks[issued]):
                held[issued] = ring.acquire([(layer, e) for e in chunks[issued]])
                issued += 1

        try:
            issue(2)
            if ram:
                rows = self.ram[layer]
                yield ExpertBatch(ram, lambda e: rows[int(slot[e])])
            for j, chunk in enumerate(chunks):
                issue(j + 1)
                if j not in held:
                    raise RuntimeError("staging ring: a chunk could not be staged")
                where = dict(zip(chunk, held[j], strict=True))
                batch = ExpertBatch(chunk, lambda e, where=where: ring.row(where[e]))
                yield batch
                last_after = batch.release_after
                ring.release(held.pop(j), last_after)
                issue(j + 3)
        finally:  # the caller stopped early (an error): copies may still read the rows
            if batch is not None and batch.release_after is not None:
                last_after = batch.release_after
            for hs in held.values():
                ring.release(hs, last_after)

    @property
    def disk_wait_s(self) -> float:
        return self.ring.wait_s

    def drain_counters(self) -> dict[int, dict[str, float]]:
        return {layer: {"disk_reads": int(c[0]), "bytes_disk": int(c[0]) * self.expert_bytes,
                        "staging_hits": int(c[1]), "disk_wait_ms": c[2] * 1000.0}
                for layer, c in self.ring.drain_counts().items()}

    def close(self) -> None:
        self.ring.close()
        self._files.close()
