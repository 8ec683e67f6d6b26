"""The compressed expert cache: a checkpoint's routed experts quantized once into a format
(experts/formats.py) and kept in the user cache, so the next start reads them directly.

One folder per checkpoint and format under `cache_dir()/experts/`, keyed by the checkpoint's
identity (resolved folder; size and modification time of config.json and of every shard the
model reads), the format and tide's format version. It holds `experts.bin`, every expert's
compressed row at a fixed offset (layer-major, experts ascending: the tiered store reads single
rows at their offsets), and `manifest.json`, with a CRC-32 per row. The folder is written
atomically; a manifest that does not match, a file of the wrong size or a row whose CRC does not
match is a damaged cache: it is rebuilt (and the user told in one line). Disk space is checked
before writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tidecli.errors import TideError
from tidecli.experts.formats import FORMAT_VERSION, ExpertFormat
from tidecli.experts.quant import quantize_rows
from tidecli.experts.runtime import read_expert_packed
from tidecli.experts.tiered import ShardFiles
from tidecli.fsutil import atomic_dir, atomic_write_json, cache_dir
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.tensorio import ShardReader, torch_dtype
from tidecli.units import GIB

CACHE_VERSION = 1
DATA, MANIFEST = "experts.bin", "manifest.json"
DISK_MARGIN = 1 << 30  # disk left free after a cache is written
CHUNK_BYTES = 256 << 20  # bf16 rows quantized at a time

Tick = Callable[[int], None]
Chunks = Iterable[tuple[int, int, torch.Tensor]]  # (layer, first expert, rows [n, row] uint8)


def _identity(ckpt: Checkpoint) -> dict:
    folder = ckpt.folder.resolve()
    files = sorted({info.file for info in ckpt.tensors.values()} | {folder / "config.json"})
    stats = []
    for f in files:
        st = Path(f).stat()
        stats.append([Path(f).name, st.st_size, st.st_mtime_ns])
    return {"folder": str(folder), "files": stats}


def cache_key(ckpt: Checkpoint, fmt: ExpertFormat) -> str:
    cfg = ckpt.config
    ident = {"checkpoint": _identity(ckpt), "format": fmt.name, "format_version": FORMAT_VERSION,
             "cache_version": CACHE_VERSION, "hidden": cfg.hidden_size,
             "inter": cfg.moe_intermediate_size, "layers": cfg.moe_layers,
             "experts": cfg.num_experts}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cache_folder(ckpt: Checkpoint, fmt: ExpertFormat, key: str | None = None) -> Path:
    key = key or cache_key(ckpt, fmt)
    return cache_dir() / "experts" / f"{ckpt.folder.resolve().name}-{fmt.name}-{key[:16]}"


def total_bytes(ckpt: Checkpoint, fmt: ExpertFormat) -> int:
    cfg = ckpt.config
    return cfg.num_moe_layers * cfg.num_experts * fmt.row_bytes


class ExpertCache:
    """An opened cache: expert e of layer ℓ at a fixed offset of one file, with its CRC-32."""

    def __init__(self, folder: Path, fmt: ExpertFormat, layers: list[int], num_experts: int,
                 crc: np.ndarray) -> None:
        self.folder, self.format = folder, fmt
        self.index = {layer: j for j, layer in enumerate(layers)}
        self.num_experts = num_experts
        self.crc = crc  # [layers, experts] uint32
        self._files = ShardFiles()

    def offset(self, layer: int, e: int) -> int:
        return (self.index[layer] * self.num_experts + e) * self.format.row_bytes

    def read(self, layer: int, first: int, out: torch.Tensor) -> None:
        """Rows first.. of `layer` into `out` [n, row] (uint8, CPU, contiguous)."""
        self._files.read(self.folder / DATA, self.offset(layer, first),
                         [memoryview(out.numpy()).cast("B")])

    def bad_row(self, layer: int, first: int, rows: torch.Tensor,
                pool: ThreadPoolExecutor | None = None) -> int | None:
        """The first expert among rows first.. whose CRC does not match (None: all match)."""
        arr = rows.numpy()
        want = self.crc[self.index[layer], first: first + arr.shape[0]]
        got = list(pool.map(zlib.crc32, arr)) if pool is not None else \
            [zlib.crc32(r) for r in arr]  # zlib releases the GIL: threads check rows at once
        bad = np.flatnonzero(np.asarray(got, dtype=np.uint32) != want)
        return first + int(bad[0]) if bad.size else None

    def invalidate(self) -> None:
        """Mark the cache damaged (its manifest goes), so the next start rebuilds it."""
        try:
            (self.folder / MANIFEST).unlink()
        except OSError:
            pass

    def close(self) -> None:
        self._files.close()


def open_cache(ckpt: Checkpoint, fmt: ExpertFormat) -> tuple[ExpertCache | None, str | None]:
    """The cache for this checkpoint and format: (cache, None), or (None, None) when there is
    none, or (None, what is wrong) when one is there but damaged."""
    key = cache_key(ckpt, fmt)
    folder = cache_folder(ckpt, fmt, key)
    if not folder.exists():
        return None, None
    cfg = ckpt.config
    layers, e = list(cfg.moe_layers), cfg.num_experts
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        crc = np.asarray(m["crc32"], dtype=np.uint32)
        ok = (m["cache_version"] == CACHE_VERSION and m["key"] == key and
              m["format"] == fmt.name and m["row_bytes"] == fmt.row_bytes and
              m["layers"] == layers and m["num_experts"] == e and crc.shape == (len(layers), e))
    except (OSError, ValueError, KeyError, TypeError):
        return None, "its manifest is missing or unreadable"
    if not ok:
        return None, "its manifest does not match this checkpoint and format"
    try:
        size = (folder / DATA).stat().st_size
    except OSError:
        return None, f"{DATA} is missing"
    if size != total_bytes(ckpt, fmt):
        return None, f"{DATA} holds {size} bytes, {total_bytes(ckpt, fmt)} expected"
    return ExpertCache(folder, fmt, layers, e, crc), None


def quantized_chunks(ckpt: Checkpoint, fmt: ExpertFormat, *, device: torch.device,
                     progress: Tick | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Every routed expert quantized, in cache order: (layer, first expert, rows [n, row] uint8
    on the CPU). The checkpoint's rows are read a chunk at a time and quantized on `device`."""
    cfg = ckpt.config
    stored = torch_dtype(ckpt.expert_dtype())
    n = max(1, min(cfg.num_experts, CHUNK_BYTES // (cfg.expert_params * stored.itemsize)))
    cuda = device.type == "cuda"
    buf = torch.empty((n, cfg.expert_params), dtype=stored, pin_memory=cuda)
    with ShardReader() as reader:
        for layer in cfg.moe_layers:
            for first in range(0, cfg.num_experts, n):
                count = min(n, cfg.num_experts - first)
                for i in range(count):
                    read_expert_packed(reader, ckpt, layer, first + i, buf[i])
                    if progress:
                        progress(cfg.expert_params * stored.itemsize)
                rows = quantize_rows(buf[:count].to(device, non_blocking=cuda), fmt)
                yield layer, first, rows.cpu()


def check_disk_space(folder: Path, need: int, what: str) -> None:
    """Refuse to write `need` bytes under `folder` when the disk would keep less than the
    margin free."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + DISK_MARGIN > free:
        raise TideError(f"not enough disk space to cache the {what}: {need / GIB:.1f} GiB "
                        f"(+{DISK_MARGIN / GIB:.0f} GiB kept free) needed under {probe}, "
                        f"{free / GIB:.1f} GiB free",
                        "free some disk space, or set TIDE_CACHE_DIR to a folder on a larger "
                        "disk")


def write_cache(ckpt: Checkpoint, fmt: ExpertFormat, chunks: Chunks) -> ExpertCache:
    """Write `chunks` (every expert, in cache order) as the cache for this checkpoint and format,
    atomically; caches of an older state of the same checkpoint and format are removed."""
    cfg = ckpt.config
    key = cache_key(ckpt, fmt)
    folder = cache_folder(ckpt, fmt, key)
    check_disk_space(folder, total_bytes(ckpt, fmt), f"{fmt.name} experts")
    layers = list(cfg.moe_layers)
    index = {layer: j for j, layer in enumerate(layers)}
    crc = np.zeros((len(layers), cfg.num_experts), dtype=np.uint32)
    done = 0
    with atomic_dir(folder, force=True) as tmp:
        with open(tmp / DATA, "wb") as fh:
            for layer, first, rows in chunks:
                arr = np.ascontiguousarray(rows.numpy())
                if index[layer] * cfg.num_experts + first != done:
                    raise AssertionError("cache chunks out of order")
                crc[index[layer], first: first + arr.shape[0]] = [zlib.crc32(r) for r in arr]
                fh.write(memoryview(arr).cast("B"))
                done += arr.shape[0]
            fh.flush()
            os.fsync(fh.fileno())
        if done != len(layers) * cfg.num_experts:
            raise AssertionError("cache chunks incomplete")
        atomic_write_json(tmp / MANIFEST, {
            "cache_version": CACHE_VERSION, "key": key, "format": fmt.name,
            "format_version": FORMAT_VERSION, "row_bytes": fmt.row_bytes, "layers": layers,
            "num_experts": cfg.num_experts, "checkpoint": _identity(ckpt),
            "crc32": crc.tolist()})
    _remove_stale(ckpt, fmt, keep=folder)
    cache, why = open_cache(ckpt, fmt)
    if cache is None:
        raise TideError(f"the {fmt.name} expert cache just written to {folder} does not read back "
                        f"({why})", "check the disk, or set TIDE_CACHE_DIR to another folder")
    return cache


def _remove_stale(ckpt: Checkpoint, fmt: ExpertFormat, *, keep: Path) -> None:
    """Caches of the same checkpoint folder and format written before it changed."""
    here = str(ckpt.folder.resolve())
    for other in keep.parent.glob(f"{ckpt.folder.resolve().name}-{fmt.name}-*"):
        if other == keep or not other.is_dir():
            continue
        try:
            m = json.loads((other / MANIFEST).read_text(encoding="utf-8"))
            same = m["checkpoint"]["folder"] == here
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if same:
            shutil.rmtree(other, ignore_errors=True)


def damaged_note(fmt: ExpertFormat, folder: Path, why: str) -> str:
    return f"the {fmt.name} expert cache at {folder} was damaged ({why}): rebuilt it"


def ensure_cache(ckpt: Checkpoint, fmt: ExpertFormat, *, device: torch.device,
                 progress: Tick | None, notices: list[str]) -> ExpertCache:
    """The cache, built first when it is missing or damaged (one notice says which). Raises
    TideError when the disk has no room for it."""
    cache, why = open_cache(ckpt, fmt)
    if cache is not None:
        return cache
    if why is not None:
        notices.append(damaged_note(fmt, cache_folder(ckpt, fmt), why))
    # write_cache checks the disk's room before the (lazy) chunks quantize anything
    return write_cache(ckpt, fmt, quantized_chunks(ckpt, fmt, device=device, progress=progress))
