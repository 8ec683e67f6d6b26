"""The parts of `tide serve` that need no server: streamed text (UTF-8, stop strings), block
tokens, request validation, decoding settings per request, Prometheus text."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidecli.decode.diffusion import DecodeSettings
from tidecli.serve.metrics import GenerationFigures, Metrics
from tidecli.serve.prepare import settings_for
from tidecli.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    ServeError,
    parse,
)
from tidecli.serve.text import BlockTokens, TextStream, settled, stop_prefix_len


def utf8(ids: list[int]) -> str:
    """A byte-level tokenizer's decode: one token per byte, broken sequences as U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def run_stream(text: str, cuts: list[int], stops: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """Feed `text`'s bytes in chunks ending at `cuts`; returns the deltas and the final text."""
    data = list(text.encode())
    stream = TextStream(utf8, stops)
    deltas, start = [], 0
    for end in sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]:
        deltas.append(stream.extend(data[start:end]))
        start = end
        if stream.stopped:
            break
    deltas.append(stream.finish(utf8(data[: start])))
    return [d for d in deltas if d], stream.final or ""


def reference_cut(text: str, stops: tuple[str, ...]) -> str:
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


ALPHABET = "ab é€😀\n"


@settings(max_examples=300, deadline=None)
@given(st.text(ALPHABET, max_size=40), st.lists(st.integers(0, 200), max_size=12))
def test_utf8_never_split(text, cuts):
    deltas, final = run_stream(text, cuts)
    assert "".join(deltas) == final == text
    assert all("\ufffd" not in d for d in deltas)  # no half character ever goes out


@settings(max_examples=300, deadline=None)
@given(st.text(ALPHABET, max_size=40), st.lists(st.integers(0, 200), max_size=12),
       st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3))
def test_stop_strings_cut_and_never_leak(text, cuts, stops):
    stops = tuple(stops)
    deltas, final = run_stream(text, cuts, stops)
    want = reference_cut(text, stops)
    assert final == want and "".join(deltas) == want
    sent = ""
    for d in deltas:  # append-only, and nothing past the cut
        sent += d
        assert want.startswith(sent)


def test_partial_stop_is_held_back_then_released():
    stream = TextStream(lambda ids: "".join(map(chr, ids)), ("world",))
    assert stream.extend([ord(c) for c in "hello wor"]) == "hello "
    assert stream.extend([ord(c) for c in "ry"]) == "worry"  # not the stop after all
    assert stream.extend([ord(c) for c in " world!"]) == " " and stream.stopped
    assert stream.finish("hello worry world!") == "" and stream.final == "hello worry "


def test_settled_helpers():
    assert stop_prefix_len("abc", ("cde", "bcx")) == 2
    assert settled("ab\ufffd\ufffd", ()) == "ab"
    assert settled("say STO", ("STOP",)) == "say "


@dataclass
class Ev:
    block_start: int
    block_tokens: list[int]
    gen_start: int
    block_done: bool = True


def test_block_tokens_cut_like_the_result():
    bt = BlockTokens(gen_length=6, eos_ids={0})
    assert bt.take(Ev(0, [9, 9, 1, 2], gen_start=2, block_done=False)) == []
    assert bt.take(Ev(0, [9, 9, 1, 2], gen_start=2)) == [1, 2]  # prompt positions skipped
    assert bt.take(Ev(4, [3, 4, 5, 6], gen_start=2)) == [3, 4, 5, 6]
    assert bt.take(Ev(8, [7, 8, 9, 9], gen_start=2)) == [] and bt.ended  # past gen_length
    eos = BlockTokens(gen_length=100, eos_ids={0})
    assert eos.take(Ev(0, [5, 0, 6, 7], gen_start=0)) == [5] and eos.ended
    assert eos.take(Ev(4, [1, 2, 3, 4], gen_start=0)) == []


# ---- requests -----------------------------------------------------------------------------------


def bad(model, data) -> ServeError:
    with pytest.raises(ServeError) as info:
        req = parse(model, data)
        if isinstance(req, ChatRequest):
            req.turns()
            req.stops()
        else:
            req.text()
    assert info.value.status == 400
    return info.value


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("data", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role"),
    ({"messages": [*USER, {"role": "system", "content": "s"}, *USER]}, "messages[1].role"),
    ({"messages": USER, "temperature": -1}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "stop": [1]}, "stop[0]"),
    ({"messages": USER, "stop": ""}, "stop"),
    ({"messages": USER, "threshold": 1.5}, "threshold"),
    ({"messages": USER, "editing_threshold": -0.1}, "editing_threshold"),
    ({"messages": USER, "seed": -3}, "seed"),
])
def test_bad_chat_requests_name_the_field(data, param):
    err = bad(ChatRequest, data)
    assert err.param == param and err.message.startswith(param), err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_chat_turns_and_completion_prompt():
    req = parse(ChatRequest, {"model": "m", "user": "ignored", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": [{"type": "text", "text": "R"}, {"type": "text", "text": "2"}]},
    ]})
    assert req.turns() == ("S", [{"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A"}], "R2")
    assert parse(CompletionRequest, {"prompt": ["x"]}).text() == "x"
    assert bad(CompletionRequest, {"prompt": ["x", "y"]}).param == "prompt"


def test_settings_per_request():
    base = DecodeSettings(gen_length=64, temperature=0.0)

    def run(data, n=10, positions=128):
        return settings_for(parse(ChatRequest, {"messages": USER, **data}), base,
                            prompt_tokens=n, max_positions=positions, prompt_field="messages")

    assert run({}).gen_length == 64 and run({}, n=100).gen_length == 28  # clipped to the room
    assert run({"max_tokens": 118}).gen_length == 118
    with pytest.raises(ServeError) as info:
        run({"max_tokens": 119})
    assert info.value.param == "max_tokens" and "118 or fewer" in info.value.message
    with pytest.raises(ServeError) as info:
        run({}, n=128)
    assert info.value.param == "messages"
    with pytest.raises(ServeError) as info:
        run({"block_length": 48})
    assert info.value.param == "block_length"
    s = run({"temperature": 0.7, "top_k": 0, "threshold": 0.8, "block_length": 16})
    assert s.seed is not None and s.top_k is None and (s.threshold, s.block_length) == (0.8, 16)
    assert run({"temperature": 0.7, "seed": 5}).seed == 5 and run({}).seed is None
    edit = DecodeSettings(editing_threshold=0.5)
    req = parse(ChatRequest, {"messages": USER, "editing_threshold": None})
    assert settings_for(req, edit, prompt_tokens=1, max_positions=4096,
                        prompt_field="messages").editing_threshold is None
    req = parse(ChatRequest, {"messages": USER, "max_completion_tokens": 7, "max_tokens": 99})
    assert settings_for(req, base, prompt_tokens=1, max_positions=4096,
                        prompt_field="messages").gen_length == 7


def test_metrics_text_is_prometheus():
    m = Metrics(queue_capacity=4)
    m.request("/v1/chat/completions", 200)
    m.request("/nope", 404)
    m.outcome("ok")
    m.generation(GenerationFigures(prompt_tokens=5, completion_tokens=20, steps=4, seconds=2.0,
                                   pairs=10, gpu_hits=7, bytes_h2d=1024, first_text_seconds=0.5))
    text = m.render()
    sample = re.compile(r'^tide_[a-z0-9_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [-0-9.e+]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP tide_") or line.startswith("# TYPE tide_") or \
            sample.match(line), line
    assert 'tide_requests_total{endpoint="other",code="404"} 1' in text
    assert "tide_tokens_per_second 10" in text and "tide_expert_hit_rate 0.7" in text
    assert "tide_first_text_seconds 0.5" in text and "tide_first_texts_total 1" in text
    assert "tide_h2d_bytes_total 1024" in text and "tide_queue_capacity 4" in text


def test_the_mean_time_to_first_text_counts_generations_that_made_text():
    m = Metrics()
    for first in (0.5, None, 1.5):  # the second generation produced no text
        m.generation(GenerationFigures(prompt_tokens=5, completion_tokens=0 if first is None
                                       else 4, steps=2, seconds=2.0, first_text_seconds=first))
    text = m.render()
    assert "tide_first_texts_total 2" in text and "tide_first_text_seconds_total 2" in text
    assert "tide_first_text_seconds 1" in text.splitlines()
