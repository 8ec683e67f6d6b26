"""Run one tide command in-process with the CUDA allocator's history recorded, and write the
snapshot (for the peak's live blocks and their Python stacks) beside the peak figures.

Usage: PYTHONPATH=. python tools/bench/vram_peak.py OUT.pickle -- generate PROMPT -m MODEL ...
Read it with `python tools/bench/vram_peak.py --read OUT.pickle` (no GPU needed).
"""

from __future__ import annotations

import pickle
import sys
from collections import Counter


def record(out: str, argv: list[str]) -> None:
    import torch

    from tidecli.cli import main

    torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    try:
        main(argv)
    except SystemExit as exc:
        print(f"exit {exc.code}", file=sys.stderr)
    finally:
        print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB, "
              f"reserved {torch.cuda.max_memory_reserved() / 2**30:.3f} GiB", file=sys.stderr)
        torch.cuda.memory._dump_snapshot(out)


def _where(frames: list[dict]) -> str:
    keep = [f for f in frames if "tidecli" in f.get("filename", "")]
    f = (keep or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{f['filename'].split('tidecli/')[-1]}:{f['line']} {f['name']}"


def read(path: str, top: int = 25) -> None:
    """Replay the trace: the moment of the most bytes allocated, and what was live then."""
    with open(path, "rb") as fh:
        snap = pickle.load(fh)
    events = [e for t in snap["device_traces"] for e in t]
    live: dict[int, tuple[int, str]] = {}
    # blocks allocated before the history started are in the segments
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated" and not b.get("frames"):
                live[b["address"]] = (b["size"], "before recording")
    cur = sum(s for s, _ in live.values())
    best, best_live = cur, dict(live)
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _where(e.get("frames", [])))
            cur += e["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            if e["action"] == "free_requested":
                cur -= live.pop(e["addr"])[0]
    print(f"peak of the recorded trace: {best / 2**30:.3f} GiB in {len(best_live)} blocks")
    by = Counter()
    for size, where in best_live.values():
        by[where] += size
    for where, size in by.most_common(top):
        print(f"{size / 2**20:10.1f} MiB  {where}")


if __name__ == "__main__":
    if sys.argv[1] == "--read":
        read(sys.argv[2])
    else:
        sep = sys.argv.index("--")
        record(sys.argv[1], sys.argv[sep + 1:])
