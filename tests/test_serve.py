"""`tide serve` end to end on the CPU: a real uvicorn server on a free 127.0.0.1 port in a
thread, the tiny model, and the real `openai` client."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import torch

from tidecli.decode.diffusion import DecodeSettings
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import engine_options
from tidecli.serve.app import create_app
from tidecli.serve.server import address, bind, make_server

HELLO = [{"role": "user", "content": "Hello"}]
LONG = {"max_tokens": 3000, "extra_body": {"threshold": 1.0}}  # one token a step: ~minutes
WAIT_S = 30.0


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu"), quiet=True)
    yield eng
    eng.close()


@dataclass
class Running:
    base: str
    app: Any

    def client(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("api_key", "none")
        return openai.OpenAI(base_url=f"{self.base}/v1", max_retries=0, timeout=WAIT_S, **kw)

    def health(self) -> dict:
        return httpx.get(f"{self.base}/health", timeout=5).json()

    def until(self, what, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)


@contextlib.contextmanager
def serving(engine, **kw: Any) -> Iterator[Running]:
    kw.setdefault("defaults", DecodeSettings(gen_length=16))
    app = create_app(engine, model_name="tiny", **kw)
    server = make_server(app)
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    run = Running(f"http://127.0.0.1:{address(sock)[1]}", app)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if httpx.get(f"{run.base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield run
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"
        assert app.state.worker_ended


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine, max_queue=8) as run:
        yield run


def direct(engine, prompt: str, settings: DecodeSettings, **kw: Any) -> str:
    """What `tide generate` prints for the same prompt and settings."""
    dec = engine.decoder(engine.prompt_ids(prompt, **kw), settings)
    for _ in dec.steps():
        pass
    return engine.tokenizer.decode(dec.result.token_ids)


def test_chat_streamed_equals_non_streamed(server, engine):
    client = server.client()
    kw = dict(model="tiny", messages=HELLO, max_tokens=70, temperature=0.8, seed=7)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert full.usage.completion_tokens == 70 and full.usage.prompt_tokens > 0
    assert full.model_extra["tide"]["seed"] == 7 and full.model_extra["tide"]["steps"] > 0
    chunks = list(client.chat.completions.create(stream=True, **kw))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 2  # one chunk per finished block, not one at the end
    assert "".join(texts) == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.total_tokens
    # the same text `tide generate` gives (server paused: the engine is idle between requests)
    want = direct(engine, "Hello", DecodeSettings(gen_length=70, temperature=0.8, seed=7))
    assert choice.message.content == want


def test_greedy_chat_with_system_and_history_is_tide_chats(server, engine):
    messages = [{"role": "system", "content": "Be brief."}, *HELLO,
                {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "More"}]
    out = server.client().chat.completions.create(model="x", messages=messages, max_tokens=20)
    want = direct(engine, "More", DecodeSettings(gen_length=20), system="Be brief.",
                  history=[{"role": "user", "content": "Hello"},
                           {"role": "assistant", "content": "Hi there"}])
    assert out.choices[0].message.content == want and out.model == "tiny"
    assert out.model_extra["tide"]["seed"] is None  # greedy


def test_completions_and_stop_strings(server, engine):
    client = server.client()
    out = client.completions.create(model="tiny", prompt="Once upon", max_tokens=40)
    want = direct(engine, "Once upon", DecodeSettings(gen_length=40), raw=True)
    assert out.choices[0].text == want and out.object == "text_completion"
    stop = want.split()[3]  # a word the reply holds: cut before its first appearance
    cut = want[: want.index(stop)]
    kw = dict(model="tiny", prompt="Once upon", max_tokens=40, stop=[stop, "never seen"])
    stopped = client.completions.create(**kw)
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    streamed = [c.choices[0].text for c in client.completions.create(stream=True, **kw)
                if c.choices]
    assert "".join(streamed) == cut


def test_models_health_metrics(server):
    m = server.app.state.metrics
    before = (m.first_texts, m.first_text_seconds)
    out = server.client().completions.create(model="tiny", prompt="Once upon", max_tokens=20)
    assert out.choices[0].text  # a generation with text: its time to first text is counted
    assert m.first_texts == before[0] + 1 and m.first_text_seconds > before[1]
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert server.health()["status"] == "ok"
    text = httpx.get(f"{server.base}/metrics", timeout=5).text
    for name in ("requests_total", "completion_tokens_total", "tokens_per_second",
                 "steps_per_second", "expert_hit_rate", "h2d_bytes_total", "queue_depth",
                 "first_text_seconds_total", "first_texts_total"):
        assert f"\ntide_{name}" in text


def test_bad_requests_are_400_naming_the_field(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=100000)
    assert info.value.body["param"] == "max_tokens" and "positions" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[])
    assert info.value.body["param"] == "messages"
    r = httpx.post(f"{server.base}/v1/chat/completions", content=b"{not json", timeout=5,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{server.base}/v1/nothing", timeout=5).status_code == 404
    assert server.client().chat.completions.create(model="t", messages=HELLO).choices  # serving


def test_api_key(engine):
    with serving(engine, api_key="sekret") as run:
        with pytest.raises(openai.AuthenticationError):
            run.client(api_key="wrong").models.list()
        r = httpx.post(f"{run.base}/v1/chat/completions", content=b"{bad", timeout=5)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{run.base}/metrics", timeout=5).status_code == 401
        assert run.health()["status"] == "ok"  # the readiness probe stays open
        out = run.client(api_key="sekret").chat.completions.create(model="t", messages=HELLO,
                                                                    max_tokens=8)
        assert out.usage.completion_tokens == 8


def long_stream(client: openai.OpenAI):
    return client.chat.completions.create(model="t", messages=HELLO, stream=True, **LONG)


def test_queue_full_429_then_served(engine):
    with serving(engine, max_queue=1) as run:
        a = long_stream(run.client())
        run.until(lambda: run.health()["running"] == 1)
        waiting = long_stream(run.client())  # a stream opens at once, then waits its turn
        run.until(lambda: run.health()["queue_depth"] == 1)
        with pytest.raises(openai.RateLimitError) as info:
            run.client().chat.completions.create(model="t", messages=HELLO, max_tokens=8)
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "queue_full"
        waiting.close()  # a client that leaves the queue frees its place at once
        run.until(lambda: run.health()["queue_depth"] == 0)
        assert run.health()["running"] == 1
        answers: list[Any] = []
        queued = threading.Thread(target=lambda: answers.append(
            run.client().chat.completions.create(model="t", messages=HELLO, max_tokens=8)))
        queued.start()
        run.until(lambda: run.health()["queue_depth"] == 1)
        a.close()  # the long one leaves: the waiting one is served
        queued.join(WAIT_S)
        assert answers and answers[0].usage.completion_tokens == 8
        assert run.app.state.metrics.generations["cancelled"] == 2


def test_disconnect_cancels_the_generation(server):
    metrics = server.app.state.metrics
    cancelled = metrics.generations["cancelled"]
    stream = long_stream(server.client())
    content = 0
    for chunk in stream:
        content += bool(chunk.choices and chunk.choices[0].delta.content)
        if content == 2:
            break
    stream.close()
    start = time.monotonic()
    server.until(lambda: metrics.generations["cancelled"] == cancelled + 1)
    out = server.client().chat.completions.create(model="t", messages=HELLO, max_tokens=8)
    assert out.usage.completion_tokens == 8
    assert time.monotonic() - start < WAIT_S  # not after the 3000-token generation
    # a client waiting for a whole (non-streamed) answer that gives up cancels it too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/chat/completions", timeout=1.0,
                   json={"messages": HELLO, "max_tokens": 3000, "threshold": 1.0})
    server.until(lambda: metrics.generations["cancelled"] == cancelled + 2)


def test_concurrent_clients_are_serialized(server):
    answers: dict[int, Any] = {}

    def ask(i: int) -> None:
        answers[i] = server.client().chat.completions.create(
            model="t", messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=24)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert sorted(answers) == [0, 1, 2, 3]
    spans = sorted((a.model_extra["tide"]["started_at"], a.model_extra["tide"]["finished_at"])
                   for a in answers.values())
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start  # one generation at a time


def test_failed_generation_answers_and_the_server_keeps_serving(server, engine, monkeypatch):
    real = engine.decoder

    def fail(exc):
        def decoder(*a, **kw):
            monkeypatch.setattr(engine, "decoder", real)  # once
            raise exc
        monkeypatch.setattr(engine, "decoder", decoder)

    client = server.client()
    fail(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="t", messages=HELLO, max_tokens=8)
    assert info.value.status_code == 503 and info.value.body["code"] == "out_of_memory"
    fail(RuntimeError("boom"))
    with pytest.raises(openai.APIError, match="internal error: RuntimeError: boom"):
        list(client.chat.completions.create(model="t", messages=HELLO, max_tokens=8,
                                            stream=True))
    assert client.chat.completions.create(model="t", messages=HELLO, max_tokens=8).choices


@pytest.mark.gpu
def test_cuda_engine_on_the_worker_thread(tiny_ckpt):
    """The step programs (CUDA graphs) are captured on the worker thread; the server's text is
    the same as a generation on the main thread, streamed or not."""
    eng = Engine(engine_options(model=str(tiny_ckpt), device="cuda", policy="tide", tau=2,
                                experts_per_layer=8), quiet=True)
    try:
        with serving(eng) as run:
            client = run.client()
            kw = dict(model="t", messages=HELLO, max_tokens=70, temperature=0.8, seed=3)
            full = client.chat.completions.create(**kw).choices[0].message.content
            parts = [c.choices[0].delta.content for c in client.chat.completions.create(
                stream=True, **kw) if c.choices and c.choices[0].delta.content]
            assert "".join(parts) == full
        assert full == direct(eng, "Hello", DecodeSettings(gen_length=70, temperature=0.8,
                                                           seed=3))
    finally:
        eng.close()


def test_a_worker_that_dies_mid_generation_answers_its_request_and_reports_failed(engine,
                                                                                  monkeypatch):
    """Something a generation's own error handling cannot catch ends the worker thread: the
    request it was running still gets an answer (500), and /health says `failed`."""

    class Fatal(BaseException):
        pass

    def decoder(*a, **kw):
        raise Fatal("gone")

    with serving(engine) as run:
        monkeypatch.setattr(engine, "decoder", decoder)
        with pytest.raises(openai.InternalServerError, match="the generation worker stopped"):
            run.client().chat.completions.create(model="t", messages=HELLO, max_tokens=8)
        run.until(lambda: httpx.get(f"{run.base}/health", timeout=5).status_code == 503)
        assert run.health() == {"status": "failed"}
        monkeypatch.undo()


def test_what_the_engine_notes_during_a_generation_goes_to_the_server_log(server, engine,
                                                                          capfd):
    """A note the engine makes mid-generation (a compile that fell back to eager) is written
    to the server's stderr once, after the generation it came from."""
    engine.notices.append("--compile auto: compiling the step failed (x); uncompiled")
    server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    server.until(lambda: not engine.notices)
    assert capfd.readouterr().err.count("note: --compile auto: compiling the step failed") == 1
