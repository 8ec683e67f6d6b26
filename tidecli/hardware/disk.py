"""Sequential read bandwidth of the disk that holds a folder, with a cold and a warm page cache.

The file read is the folder's largest safetensors shard when it has one (only read), else a
temporary file written there (or, if the folder is not writable, in the cache folder) and
removed afterwards. Cold: the file's pages are dropped from the page cache first with
`posix_fadvise(DONTNEED)`; where that call does not exist or fails, the first read is reported
as warm and the result says so. Warm: the same bytes read again, straight after.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 << 20  # bytes per read call: large and sequential, like an expert read


@dataclass(frozen=True)
class DiskRead:
    gbps: float  # the first read: cold when `cold`, else warm
    warm_gbps: float
    cold: bool  # the page cache was dropped before the first read
    nbytes: int
    source: str  # "model file" | "temporary file"

    def note(self) -> str:
        size = f"{self.nbytes / 2**20:.0f} MiB of a {self.source}"
        if not self.cold:
            return (f"disk read: the page cache could not be dropped, so {self.gbps:.2f} GB/s is "
                    f"a warm figure ({size}); cold reads from the disk can be much slower")
        text = (f"disk read: {self.gbps:.2f} GB/s cold (page cache dropped), "
                f"{self.warm_gbps:.2f} GB/s warm ({size})")
        if self.gbps >= 0.8 * self.warm_gbps:
            text += ("; cold was about as fast as warm: the file may have stayed cached "
                     "(e.g. a RAM-backed folder)")
        return text


def drop_cache(fd: int) -> bool:
    """Ask the kernel to forget the file's cached pages; False where it cannot be asked."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return False
    try:
        os.fsync(fd)  # dirty pages are not dropped
    except OSError:
        pass
    try:
        fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    return True


def read_seconds(fd: int, nbytes: int) -> float:
    """Time reading `nbytes` from the start of the file, CHUNK at a time, into one buffer."""
    buf = bytearray(min(CHUNK, max(1, nbytes)))
    view = memoryview(buf)
    t0 = time.perf_counter()
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[: min(len(buf), nbytes - done)]], done) \
            if hasattr(os, "preadv") else _pread(fd, view, done, nbytes - done)
        if n <= 0:
            break
        done += n
    return max(time.perf_counter() - t0, 1e-9)


def _pread(fd: int, view: memoryview, offset: int, left: int) -> int:
    os.lseek(fd, offset, os.SEEK_SET)
    data = os.read(fd, min(len(view), left))
    view[: len(data)] = data
    return len(data)


def _largest_shard(folder: Path) -> Path | None:
    files = [p for p in folder.glob("*.safetensors") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size, default=None)


def _write_temp(folder: Path, nbytes: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tide-disk-", dir=folder)
    block = os.urandom(min(CHUNK, nbytes))  # incompressible: a compressing filesystem cannot cheat
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(len(block), left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return Path(name)


def measure_disk(folder: Path, nbytes: int, *, fallback: Path | None = None) -> DiskRead:
    """Read bandwidth of the disk holding `folder` (see the module's doc)."""
    folder = Path(folder)
    shard = _largest_shard(folder) if folder.is_dir() else None
    temp = None
    if shard is not None and shard.stat().st_size > 0:
        path, source = shard, "model file"
        nbytes = min(nbytes, shard.stat().st_size)
    else:
        try:
            temp = _write_temp(folder, nbytes)
        except OSError:
            if fallback is None:
                raise
            temp = _write_temp(fallback, nbytes)
        path, source = temp, "temporary file"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            cold = drop_cache(fd)
            first = read_seconds(fd, nbytes)
            warm = read_seconds(fd, nbytes)
        finally:
            os.close(fd)
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)
    return DiskRead(gbps=nbytes / first / 1e9, warm_gbps=nbytes / warm / 1e9, cold=cold,
                    nbytes=nbytes, source=source)


def disk_fields(folder: Path | None, nbytes: int, notes: list[str]) -> dict:
    """Profile fields for the disk of `folder` (default: the cache folder); a note says which
    figure is cold."""
    from tidecli.fsutil import cache_dir

    res = measure_disk(folder or cache_dir(), nbytes, fallback=cache_dir())
    notes.append(res.note())
    return {"disk_read_gbps": round(res.gbps, 3), "disk_read_warm_gbps": round(res.warm_gbps, 3),
            "disk_read_cold": res.cold}
