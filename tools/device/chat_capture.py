"""Drive `tide chat` in a real pseudo-terminal and keep every byte it draws, with timestamps,
so a frame mid-generation can be rendered afterwards (e.g. with pyte).

Usage: python tools/device/chat_capture.py OUT_DIR -- [tide chat options]
Writes OUT_DIR/chat.raw (the terminal stream) and OUT_DIR/chat.json (byte offsets of events).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import sys
import termios
import time

COLS, ROWS = 110, 32
PROMPT = b"you> "


def main() -> None:
    out = sys.argv[1]
    args = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    os.makedirs(out, exist_ok=True)
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(TERM="xterm-256color", COLUMNS=str(COLS), LINES=str(ROWS))
        os.execvp(sys.executable, [sys.executable, "-m", "tidecli", "chat", *args])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    buf = bytearray()
    marks: list[dict] = []
    t0 = time.monotonic()

    def pump(until: bytes | None, timeout: float, start: int = 0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.05)
            if r:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    return False
                if not data:
                    return False
                buf.extend(data)
            if until is not None and until in buf[start:]:
                return True
        return until is None

    def mark(name: str) -> None:
        marks.append({"event": name, "offset": len(buf), "t": round(time.monotonic() - t0, 3)})

    pump(PROMPT, 300)
    mark("ready")
    for message in ("Write a long story about a lighthouse keeper who finds a map.",
                    "Now summarise it in one line."):
        start = len(buf)
        os.write(fd, message.encode() + b"\r")
        mark("sent")
        for _ in range(6):  # frames while the reply is being denoised
            pump(None, 1.5)
            mark("frame")
        pump(PROMPT, 600, start + len(message) + 2)
        mark("reply done")
    start = len(buf)
    os.write(fd, b"/stats\r")
    pump(PROMPT, 30, start + 8)
    mark("stats")
    os.write(fd, b"/exit\r")
    pump(None, 5)
    mark("exit")
    _, status = os.waitpid(pid, 0)
    with open(os.path.join(out, "chat.raw"), "wb") as f:
        f.write(bytes(buf))
    with open(os.path.join(out, "chat.json"), "w") as f:
        json.dump({"cols": COLS, "rows": ROWS, "args": args, "marks": marks,
                   "exit_status": os.waitstatus_to_exitcode(status)}, f, indent=1)
    print(f"captured {len(buf)} bytes, exit {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    main()
