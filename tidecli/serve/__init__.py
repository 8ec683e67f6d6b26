"""`tide serve`: an OpenAI-compatible HTTP server in front of one engine.

`protocol.py` (request models, response and error bodies), `text.py` (committed tokens → the
append-only text a client may see), `worker.py` (the one thread that owns the engine, and its
bounded FIFO queue), `metrics.py` (Prometheus text), `app.py` (the FastAPI app: routes, auth,
SSE), `server.py` (uvicorn, with SIGINT/SIGTERM stopping generation after the current step).
FastAPI and uvicorn are the `serve` extra: nothing here is imported by `tide --help`.
"""
