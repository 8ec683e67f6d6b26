"""A bounded load test of a running `tide serve` on this machine: N clients, each sending M
streamed chat requests one after another; prints one JSON object with latency percentiles,
time to first chunk (the first text, not the role chunk) and throughput.

Localhost only: the URL must name a loopback address. Every request has a timeout and the
whole run a deadline after which no client starts another request, so it always ends.

Usage: python3 tools/bench/serve_load.py [--url http://127.0.0.1:8000] [--clients 4]
       [--requests 4] [--max-tokens 64] [--prompts FILE] [--warmup 1] [--api-key KEY]
       [--extra '{"threshold": 0.9}'] [--timeout 300] [--deadline 1800]
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_PROMPTS = Path(__file__).with_name("bench_prompts.txt")


@dataclass
class Result:
    ok: bool
    latency_s: float
    ttfc_s: float | None  # time to the first chunk carrying text
    tokens: int
    steps: int
    error: str = ""


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def one_request(host: str, port: int, body: dict, headers: dict, timeout: float) -> Result:
    start = time.perf_counter()
    ttfc, tokens, steps = None, 0, 0
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return Result(False, time.perf_counter() - start, None, 0, 0,
                          f"HTTP {resp.status}: {resp.read(300).decode(errors='replace')}")
        for raw in resp:  # SSE lines; each read is bounded by the socket timeout
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return Result(True, time.perf_counter() - start, ttfc, tokens, steps)
            chunk = json.loads(data)
            if "error" in chunk:
                return Result(False, time.perf_counter() - start, ttfc, tokens, steps,
                              chunk["error"].get("message", "error"))
            choices = chunk.get("choices") or []
            if ttfc is None and choices and choices[0].get("delta", {}).get("content"):
                ttfc = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("tide"):
                steps = chunk["tide"].get("steps", 0)
        return Result(False, time.perf_counter() - start, ttfc, tokens, steps, "no [DONE]")
    except (OSError, http.client.HTTPException, ValueError) as exc:  # timeouts are OSErrors
        return Result(False, time.perf_counter() - start, ttfc, tokens, steps,
                      f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)

    def q(p: float) -> float:  # linear interpolation between closest ranks
        k = (len(v) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"p50": round(q(0.5), 4), "p90": round(q(0.9), 4), "p99": round(q(0.99), 4),
            "mean": round(sum(v) / len(v), 4), "max": round(v[-1], 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--warmup", type=int, default=1, help="requests before the timed run")
    ap.add_argument("--api-key")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--extra", default="{}", help="JSON merged into each request's body")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--deadline", type=float, default=1800.0, help="seconds for the whole run")
    a = ap.parse_args()

    url = urlsplit(a.url)
    host, port = url.hostname or "", url.port or 80
    if url.scheme != "http" or not loopback(host):
        sys.exit(f"error: --url must be http:// on a loopback address (got {a.url})")
    if not (1 <= a.clients <= 256 and 1 <= a.requests <= 10_000):
        sys.exit("error: --clients must be 1..256 and --requests 1..10000")
    prompts = [p.strip() for p in a.prompts.read_text().splitlines() if p.strip()]
    headers = {"Content-Type": "application/json"}
    if a.api_key:
        headers["Authorization"] = f"Bearer {a.api_key}"

    def body(i: int) -> dict:
        return {"model": "tide", "stream": True, "max_tokens": a.max_tokens,
                "temperature": a.temperature,
                "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                **json.loads(a.extra)}

    for i in range(a.warmup):  # CUDA graph capture and caches, outside the figures
        r = one_request(host, port, body(i), headers, a.timeout)
        if not r.ok:
            sys.exit(f"error: the warm-up request failed: {r.error}")

    results: list[Result] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + a.deadline

    def client(c: int) -> None:
        for m in range(a.requests):
            if time.perf_counter() >= stop_at:
                return
            r = one_request(host, port, body(c * a.requests + m), headers,
                            min(a.timeout, max(1.0, stop_at - time.perf_counter())))
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(c,), daemon=True)
               for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.perf_counter()) + a.timeout)
    wall = time.perf_counter() - start
    with lock:
        done = list(results)
    ok = [r for r in done if r.ok]
    tokens = sum(r.tokens for r in ok)
    out = {
        "url": a.url, "clients": a.clients, "requests_per_client": a.requests,
        "max_tokens": a.max_tokens, "extra": json.loads(a.extra),
        "sent": len(done), "ok": len(ok), "errors": len(done) - len(ok),
        "first_errors": sorted({r.error for r in done if not r.ok})[:3],
        "wall_s": round(wall, 3),
        "latency_s": percentiles([r.latency_s for r in ok]),
        "ttfc_s": percentiles([r.ttfc_s for r in ok if r.ttfc_s is not None]),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 3) if wall else 0.0,
        "requests_per_s": round(len(ok) / wall, 4) if wall else 0.0,
        "tokens_per_step": round(tokens / s, 3) if (s := sum(r.steps for r in ok)) else None,
    }
    print(json.dumps(out, indent=2))
    return 0 if ok and len(ok) == len(done) else 1


if __name__ == "__main__":
    sys.exit(main())
