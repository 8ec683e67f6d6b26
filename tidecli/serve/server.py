"""Running the app under uvicorn: the socket is bound before the model loads (a port in use
fails at once, not after minutes of loading), the port opens once the worker runs, and
SIGINT/SIGTERM stop the generation after its current step and end the process normally."""

from __future__ import annotations

import logging
import os
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn

from tidecli.errors import TideError

GRACE_S = 30  # after a stop signal, how long open responses may take to end


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not listening yet: uvicorn listens when it starts)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TideError(f"cannot resolve --host {host}: {exc.strerror}",
                        "use an address such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise TideError(f"cannot listen on {host}:{port}: {exc.strerror}",
                        "choose another --port, or stop the server that holds it") from None
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return host, port


class _QuietWhenForced(logging.Filter):
    """Drops uvicorn's error records once a second Ctrl-C forced the exit: cutting the app's
    lifespan short then logs a CancelledError traceback, which is the expected way out, not
    an error (TIDE_DEBUG=1 keeps it)."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.server.force_exit and record.levelno >= logging.ERROR
                    and os.environ.get("TIDE_DEBUG") != "1")


class Server(uvicorn.Server):
    """uvicorn whose stop signals also halt the worker, and which does not raise the signal
    again after a clean shutdown (uvicorn's default), so `tide serve` exits 0. A second Ctrl-C
    stops at once, as uvicorn's does, without the traceback uvicorn logs for it."""

    def __init__(self, config: uvicorn.Config, worker: Any) -> None:
        super().__init__(config)
        self.worker = worker
        self.stop_signal: int | None = None

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        # over the whole run: a forced exit's traceback is logged as the event loop closes
        quiet = _QuietWhenForced(self)
        log = logging.getLogger("uvicorn.error")
        log.addFilter(quiet)
        try:
            super().run(sockets=sockets)
        finally:
            log.removeFilter(quiet)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop_signal = self.stop_signal or sig
        self.worker.halt()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def make_server(app: Any, *, log_level: str = "warning") -> Server:
    config = uvicorn.Config(app, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=GRACE_S)
    return Server(config, app.state.worker)
