"""One thread owns the engine and runs one generation at a time; requests wait in a bounded FIFO.

The event loop only submits jobs and reads what they send back (`Job.events`, an asyncio queue
the worker fills through `call_soon_threadsafe`): text as blocks become final, then the outcome
or an error. A job is cancelled by a flag the decoding loop reads between steps (drive's
`should_stop`), so the runtime is never left half-way through a forward pass; `halt` (SIGINT,
SIGTERM) stops the running generation the same way and answers the waiting ones with 503.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tidecli.decode.diffusion import DecodeSettings
from tidecli.decode.session import drive
from tidecli.errors import TideError, out_of_memory
from tidecli.serve.metrics import GenerationFigures, Metrics
from tidecli.serve.protocol import ServeError, bad_request
from tidecli.serve.text import BlockTokens, TextStream
from tidecli.units import per

WAIT_S = 0.5  # how often an idle worker looks at its stop flag


@dataclass(frozen=True)
class Generation:
    """A validated request, ready to decode."""

    ids: tuple[int, ...]
    settings: DecodeSettings
    stops: tuple[str, ...] = ()
    stream: bool = False


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    steps: int
    wall_seconds: float
    queue_seconds: float
    started_at: float  # unix time
    finished_at: float
    seed: int | None
    hit_rate: float
    bytes_h2d: int

    def tide(self) -> dict[str, Any]:
        """tide's own figures, the responses' `tide` extension field."""
        return {
            "steps": self.steps,
            "tokens_per_step": round(per(self.completion_tokens, self.steps), 4),
            "tokens_per_second": round(per(self.completion_tokens, self.wall_seconds), 4),
            "steps_per_second": round(per(self.steps, self.wall_seconds), 4),
            "hit_rate": round(self.hit_rate, 6),
            "h2d_bytes": self.bytes_h2d,
            "seed": self.seed,
            "generation_seconds": round(self.wall_seconds, 4),
            "queue_seconds": round(self.queue_seconds, 4),
            "started_at": round(self.started_at, 4),
            "finished_at": round(self.finished_at, 4),
        }


class Job:
    """One request's generation, as the event loop and the worker share it."""

    def __init__(self, gen: Generation, loop: asyncio.AbstractEventLoop) -> None:
        self.gen = gen
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.enqueued = time.monotonic()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def push(self, kind: str, payload: Any) -> None:
        """("delta", text), ("done", Outcome) or ("error", ServeError), from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Worker:
    def __init__(self, engine: Any, metrics: Metrics, *, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        metrics.queue_capacity = max_queue
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._running = False
        self._mean_seconds = 0.0  # of recent generations, for Retry-After
        self._thread: threading.Thread | None = None
        self._cuda_index: int | None = None
        # set when the worker thread itself fails (not a generation: those answer their request);
        # the server then stops, and the command reports it
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None

    # ---- the event loop's side ------------------------------------------------------------------

    def start(self) -> None:
        device = self.engine.device
        if device.type == "cuda":  # the current device is per thread: name it for the worker
            import torch

            self._cuda_index = device.index if device.index is not None else \
                torch.cuda.current_device()
        self._thread = threading.Thread(target=self._loop, name="tide-worker", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._halt.is_set()

    @property
    def halted(self) -> bool:
        return self._halt.is_set()

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.ready:
                raise ServeError(503, "the server is shutting down", type="server_error",
                                 code="shutting_down")
            if len(self._pending) >= self.max_queue:
                self.metrics.reject()
                wait = self._mean_seconds * (len(self._pending) + 1)
                raise ServeError(
                    429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                    type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(min(3600, max(1, math.ceil(wait))))})
            self._pending.append(job)
            self._publish()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client left: the job stops after the current step, or leaves the queue now."""
        job.cancel()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.metrics.outcome("cancelled")
                self._publish()

    def halt(self) -> None:
        """Stop: the running generation after its current step, the waiting ones now (503)."""
        self._halt.set()
        with self._cond:
            self._fail_pending()
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait for the worker to end (after `halt`); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.engine.tokenizer.decode(ids)

    # ---- the worker thread ----------------------------------------------------------------------

    def _publish(self) -> None:
        self.metrics.set_queue(len(self._pending), int(self._running))

    def _fail_pending(self) -> None:
        while self._pending:
            job = self._pending.popleft()
            self.metrics.outcome("stopped")
            job.push("error", ServeError(503, "the server is shutting down", type="server_error",
                                         code="shutting_down"))
        self._publish()

    def _next(self) -> Job | None:
        with self._cond:
            while True:
                if self._halt.is_set():
                    self._fail_pending()
                    return None
                while self._pending:
                    job = self._pending.popleft()
                    if not job.cancelled:  # a client that left while waiting is skipped
                        self._running = True
                        self._publish()
                        return job
                    self.metrics.outcome("cancelled")
                self._publish()
                self._cond.wait(WAIT_S)

    def _loop(self) -> None:
        job: Job | None = None
        try:
            if self._cuda_index is not None:
                import torch

                torch.cuda.set_device(self._cuda_index)
            while True:
                job = self._next()
                if job is None:
                    return
                try:
                    self._serve(job)
                    job = None
                finally:
                    with self._cond:
                        self._running = False
                        self._publish()
        except BaseException as exc:  # the worker is gone: answer the waiting, stop the server
            self.failure = exc
            self._halt.set()
            if job is not None:  # the generation it was running gets an answer too
                self.metrics.outcome("error")
                job.push("error", ServeError(500, "internal error: the generation worker "
                                                  "stopped", type="server_error",
                                             code="internal_error"))
            with self._cond:
                self._fail_pending()
            if os.environ.get("TIDE_DEBUG") == "1":
                import traceback

                traceback.print_exception(exc)
            if self.on_failure is not None:
                self.on_failure(exc)

    def _serve(self, job: Job) -> None:
        try:
            outcome = self._generate(job)
        except ServeError as exc:
            self.metrics.outcome("stopped" if exc.code == "shutting_down" else "error")
            job.push("error", exc)
        except TideError as exc:  # what the engine refuses (length, settings)
            self.metrics.outcome("error")
            job.push("error", bad_request(exc.message))
        except Exception as exc:
            self.metrics.outcome("error")
            job.push("error", self._failure(exc))
        else:
            if outcome is not None:
                self.metrics.outcome("ok")
                job.push("done", outcome)
        finally:  # what the engine learned during the generation (a failed compile)
            for note in self.engine.notices:
                sys.stderr.write(f"note: {note}\n")
            self.engine.notices.clear()

    def _failure(self, exc: Exception) -> ServeError:
        oom = out_of_memory(exc, hint="")
        if oom is not None:
            if self.engine.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            return ServeError(503, f"{oom.message} during this generation; ask for fewer tokens "
                                   "or restart with a lower --vram", type="server_error",
                              code="out_of_memory")
        first = str(exc).splitlines()[0] if str(exc) else ""
        sys.stderr.write(f"error: internal error in a generation: {type(exc).__name__}: {first}\n")
        if os.environ.get("TIDE_DEBUG") == "1":
            import traceback

            traceback.print_exception(exc)
        return ServeError(500, f"internal error: {type(exc).__name__}: {first}",
                          type="server_error", code="internal_error")

    def _generate(self, job: Job) -> Outcome | None:
        g, eng = job.gen, self.engine
        queued = time.monotonic() - job.enqueued
        started, t0 = time.time(), time.monotonic()
        first_text: list[float] = []  # seconds from the start to the first text, once
        eng.runtime.reset_stats()  # the figures below are this generation's only
        decoder = eng.decoder(list(g.ids), g.settings)
        blocks = BlockTokens(g.settings.gen_length, decoder.eos_ids)
        text = TextStream(self.decode, g.stops)

        def on_event(ev: Any) -> None:
            new = blocks.take(ev)
            if new:
                delta = text.extend(new)
                if delta and not first_text:
                    first_text.append(time.monotonic() - t0)
                if delta and g.stream:
                    job.push("delta", delta)

        result, interrupted = drive(
            decoder, on_event,
            should_stop=lambda: job.cancelled or text.stopped or self._halt.is_set())
        if job.cancelled:
            self.metrics.outcome("cancelled")
            return None
        if interrupted and not text.stopped:
            raise ServeError(503, "the server is shutting down", type="server_error",
                             code="shutting_down")
        rest = text.finish(self.decode(result.token_ids))
        if rest and not first_text:
            first_text.append(time.monotonic() - t0)
        if rest and g.stream:
            job.push("delta", rest)
        stats = eng.runtime.run_stats.total()
        self.metrics.generation(GenerationFigures(
            prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids),
            steps=result.steps, seconds=result.wall_seconds, pairs=stats.pairs,
            gpu_hits=stats.gpu_hits, bytes_h2d=stats.bytes_h2d,
            first_text_seconds=first_text[0] if first_text else None))
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * result.wall_seconds \
            if self._mean_seconds else result.wall_seconds
        return Outcome(
            text=text.final or "", prompt_tokens=result.prompt_tokens,
            finish_reason="stop" if text.stopped or result.stopped_at_eos else "length",
            completion_tokens=len(result.token_ids), steps=result.steps,
            wall_seconds=result.wall_seconds, queue_seconds=queued, started_at=started,
            finished_at=time.time(), seed=g.settings.seed if g.settings.temperature > 0 else None,
            hit_rate=stats.hit_rate, bytes_h2d=stats.bytes_h2d)
