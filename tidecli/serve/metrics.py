"""The server's counters and their Prometheus text (`GET /metrics`, exposition format 0.0.4).

Written by the worker thread and the event loop, read by scrapes: one lock. Counters only grow
(a scraper's rate() gives tokens/s over any window); the `last_*` gauges are the most recent
generation's own rates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
OUTCOMES = ("ok", "stopped", "cancelled", "error")  # stopped: by the server shutting down


@dataclass
class GenerationFigures:
    """One finished generation, as the worker reports it to the metrics."""

    prompt_tokens: int
    completion_tokens: int
    steps: int
    seconds: float
    pairs: int = 0  # routed (token, expert) pairs
    gpu_hits: int = 0  # of those, experts resident when the layer began
    bytes_h2d: int = 0
    # from the generation's start to its first text (its first finished block), None if none
    first_text_seconds: float | None = None


@dataclass
class Metrics:
    queue_capacity: int = 0
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    rejected: int = 0  # 429: the queue was full
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    pairs: int = 0
    gpu_hits: int = 0
    bytes_h2d: int = 0
    first_text_seconds: float = 0.0  # summed over the generations that produced text
    first_texts: int = 0
    last_tokens_per_second: float = 0.0
    last_steps_per_second: float = 0.0
    queue_depth: int = 0
    running: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self, path: str, status: int) -> None:
        key = (path if path in ENDPOINTS else "other", status)
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def outcome(self, name: str) -> None:
        with self._lock:
            self.generations[name] = self.generations.get(name, 0) + 1

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def set_queue(self, depth: int, running: int) -> None:
        with self._lock:
            self.queue_depth, self.running = depth, running

    def generation(self, g: GenerationFigures) -> None:
        with self._lock:
            self.prompt_tokens += g.prompt_tokens
            self.completion_tokens += g.completion_tokens
            self.steps += g.steps
            self.seconds += g.seconds
            self.pairs += g.pairs
            self.gpu_hits += g.gpu_hits
            self.bytes_h2d += g.bytes_h2d
            if g.first_text_seconds is not None:
                self.first_text_seconds += g.first_text_seconds
                self.first_texts += 1
            if g.seconds > 0:
                self.last_tokens_per_second = g.completion_tokens / g.seconds
                self.last_steps_per_second = g.steps / g.seconds

    def render(self) -> str:
        with self._lock:
            out: list[str] = []

            def metric(name: str, kind: str, help_: str,
                       samples: list[tuple[str, float]]) -> None:
                out.append(f"# HELP tide_{name} {help_}")
                out.append(f"# TYPE tide_{name} {kind}")
                out.extend(f"tide_{name}{labels} {_num(v)}" for labels, v in samples)

            metric("requests_total", "counter", "HTTP responses by endpoint and status code.",
                   [(f'{{endpoint="{p}",code="{c}"}}', n)
                    for (p, c), n in sorted(self.requests.items())])
            metric("generations_total", "counter", "Generations by how they ended.",
                   [(f'{{outcome="{k}"}}', n) for k, n in sorted(self.generations.items())])
            metric("rejected_total", "counter", "Requests refused with 429: the queue was full.",
                   [("", self.rejected)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                   [("", self.prompt_tokens)])
            metric("completion_tokens_total", "counter", "Generated tokens.",
                   [("", self.completion_tokens)])
            metric("steps_total", "counter", "Denoising steps.", [("", self.steps)])
            metric("generation_seconds_total", "counter", "Time spent generating.",
                   [("", self.seconds)])
            metric("first_text_seconds_total", "counter",
                   "Time from a generation's start to its first text (its first finished block), "
                   "summed over the generations that produced text.",
                   [("", self.first_text_seconds)])
            metric("first_texts_total", "counter", "Generations that produced text.",
                   [("", self.first_texts)])
            metric("first_text_seconds", "gauge",
                   "Mean time from a generation's start to its first text.",
                   [("", self.first_text_seconds / self.first_texts if self.first_texts else 0.0)])
            metric("tokens_per_second", "gauge", "Generated tokens per second, all generations.",
                   [("", self.completion_tokens / self.seconds if self.seconds else 0.0)])
            metric("steps_per_second", "gauge", "Denoising steps per second, all generations.",
                   [("", self.steps / self.seconds if self.seconds else 0.0)])
            metric("last_tokens_per_second", "gauge", "Tokens per second of the last generation.",
                   [("", self.last_tokens_per_second)])
            metric("last_steps_per_second", "gauge", "Steps per second of the last generation.",
                   [("", self.last_steps_per_second)])
            metric("expert_pairs_total", "counter", "Routed (token, expert) pairs.",
                   [("", self.pairs)])
            metric("expert_hits_total", "counter",
                   "Routed pairs whose expert was resident on the device.", [("", self.gpu_hits)])
            metric("expert_hit_rate", "gauge", "Share of routed pairs that were hits.",
                   [("", self.gpu_hits / self.pairs if self.pairs else 1.0)])
            metric("h2d_bytes_total", "counter", "Expert bytes moved host to device.",
                   [("", self.bytes_h2d)])
            metric("queue_depth", "gauge", "Requests waiting for the engine.",
                   [("", self.queue_depth)])
            metric("queue_capacity", "gauge", "Requests that may wait (--max-queue).",
                   [("", self.queue_capacity)])
            metric("running", "gauge", "Generations running (0 or 1).", [("", self.running)])
            return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if isinstance(v, int) or float(v).is_integer() else repr(float(v))
