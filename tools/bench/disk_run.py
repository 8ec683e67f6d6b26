"""Run one `tide` command and report what it cost the disk and RAM: bytes the block devices
actually read (system-wide counters, so page-cache hits do not count), wall time and the
child's peak RSS. `--cold` first drops the model folder's files from the page cache
(posix_fadvise DONTNEED, no root needed for clean pages).

Usage: python3 tools/bench/disk_run.py (--cold|--warm) MODEL_DIR -- TIDE_ARGS...
The command's stdout passes through; the summary goes to stderr as one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil


def drop_cache(folder: Path) -> int:
    n = 0
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    mode, folder, cmd = args[0], Path(args[1]), args[split + 1:]
    if mode == "--cold":
        os.sync()
        drop_cache(folder)
    before = psutil.disk_io_counters()
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "tidecli", *cmd])
    wall = time.perf_counter() - t0
    after = psutil.disk_io_counters()
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    read = after.read_bytes - before.read_bytes
    print(json.dumps({"mode": mode.strip("-"), "rc": rc, "wall_s": round(wall, 2),
                      "device_read_bytes": read, "device_read_gbps": round(read / wall / 1e9, 3),
                      "peak_rss_bytes": rss}), file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
