"""The OpenAI API as tide speaks it: request models (validated by pydantic, so a bad field is
named in the 400), the error shape, and the bodies of responses and stream chunks.

Unknown request fields are ignored, as OpenAI-compatible servers do (clients send `user`,
penalties …); the diffusion settings are extra body fields (`threshold`, `block_length`,
`editing_threshold`, `max_post_steps`). Responses carry tide's own figures under `tide`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOPS = 16
SEED_MAX = 2**63 - 1
UNION_TAGS = {"str", "int", "float", "bool", "none"}


class ServeError(Exception):
    """An answer in the OpenAI error shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, param=param)


def field_path(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as the request's field: ('body', 'messages', 0, 'role') →
    'messages[0].role'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in str(part) and part not in UNION_TAGS:  # pydantic's union member tags
            out += ("." if out else "") + str(part)
    return out


def validation_error(errors: list[dict[str, Any]]) -> ServeError:
    """The first of pydantic's errors as one 400 that names the field."""
    if not errors:
        return bad_request("invalid request")
    # a union reports one error per member: the deepest path names the field best
    first = field_path(tuple(errors[0].get("loc", ())))
    same = [e for e in errors if field_path(tuple(e.get("loc", ()))).startswith(first)]
    e = max(same, key=lambda e: len(field_path(tuple(e.get("loc", ())))))
    param = field_path(tuple(e.get("loc", ())))
    if e.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {e.get('msg', '')}")
    msg = str(e.get("msg", "invalid value"))
    return bad_request(f"{param}: {msg}" if param else msg, param or None)


# ---- requests -----------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints take: length, sampling, stop strings, streaming, diffusion."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None  # 0 or -1: off (the vLLM/SGLang convention)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    # diffusion settings (extra body fields)
    threshold: float | None = Field(None, gt=0, le=1)
    block_length: int | None = Field(None, ge=1)
    editing_threshold: float | None = Field(None, ge=0, le=1)
    max_post_steps: int | None = Field(None, ge=0)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise bad_request(f"stop: at most {MAX_STOPS} strings", "stop")
        if any(not s for s in stops):
            raise bad_request("stop: an empty string would stop at once", "stop")
        return tuple(stops)

    def length(self) -> tuple[int | None, str]:
        """The asked generation length and the field that asked for it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)

    def turns(self) -> tuple[str | None, list[dict[str, str]], str]:
        """(system prompt, earlier turns, the last user message) for the chat template."""
        system: list[str] = []
        history: list[dict[str, str]] = []
        for i, m in enumerate(self.messages):
            if m.role in ("system", "developer"):
                if history:
                    raise bad_request(f"messages[{i}].role: system messages must come first",
                                      f"messages[{i}].role")
                system.append(m.text())
            else:
                history.append({"role": m.role, "content": m.text()})
        if not history or history[-1]["role"] != "user":
            n = len(self.messages) - 1
            raise bad_request(f"messages[{n}].role: the last message must be the user's",
                              f"messages[{n}].role")
        last = history.pop()
        return ("\n".join(system) or None), history, last["content"]


class CompletionRequest(Sampling):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise bad_request("prompt: one prompt per request", "prompt")
        return self.prompt[0]


def parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


# ---- responses ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shape:
    """The bodies of one response: chat (`chat.completion`) or text (`text_completion`)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, *, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {} if text is None else {"content": text},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish}

    def full(self, text: str, finish: str, use: dict[str, int], tide: dict[str, Any]) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [self._choice(text, finish, delta=False)],
                "usage": use, "tide": tide}

    def _chunk_head(self) -> dict[str, Any]:
        return self._head("chat.completion.chunk" if self.chat else "text_completion")

    def first(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role (OpenAI's first chunk)."""
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return {**self._chunk_head(), "choices": [choice]}

    def delta(self, text: str) -> dict[str, Any]:
        return {**self._chunk_head(), "choices": [self._choice(text, None, delta=True)]}

    def last(self, finish: str, use: dict[str, int] | None, tide: dict[str, Any]) -> dict:
        out = {**self._chunk_head(), "choices": [self._choice(None, finish, delta=True)],
               "tide": tide}
        if use is not None:
            out["usage"] = use
        return out

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        """stream_options.include_usage: a last chunk with no choices and the usage."""
        return {**self._chunk_head(), "choices": [], "usage": use}
