"""From a validated request to a `Generation`: the prompt's tokens (through the chat template,
as `tide chat` renders it, or raw for /v1/completions), the decoding settings (the request's
over the server's), a length the model's positions can hold, and a seed.

Runs before a request is queued, so a bad one is answered at once rather than after the queue.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from tidecli.decode.diffusion import DecodeSettings
from tidecli.errors import TideError
from tidecli.serve.protocol import ChatRequest, CompletionRequest, Sampling, bad_request
from tidecli.serve.worker import Generation, Worker


def settings_for(req: Sampling, defaults: DecodeSettings, *, prompt_tokens: int,
                 max_positions: int, prompt_field: str) -> DecodeSettings:
    """The request's decoding settings; 400 naming the field for any that cannot run."""
    room = max_positions - prompt_tokens
    if room < 1:
        raise bad_request(f"{prompt_field}: the prompt is {prompt_tokens} tokens; the model holds "
                          f"{max_positions} positions", prompt_field)
    asked, field = req.length()
    if asked is None:
        gen_length = min(defaults.gen_length, room)
    elif asked > room:
        raise bad_request(f"{field}: the prompt ({prompt_tokens} tokens) + {field} {asked} "
                          f"exceeds the model's {max_positions} positions; ask for {room} or "
                          "fewer", field)
    else:
        gen_length = asked
    block_length = req.block_length or defaults.block_length
    if max_positions % block_length:
        raise bad_request(f"block_length: {block_length} does not divide the model's "
                          f"{max_positions} positions (32 is the trained block length)",
                          "block_length")

    def pick(name: str) -> Any:
        # a field the request sets (null included, e.g. editing_threshold: null turns it off)
        return getattr(req, name) if name in req.model_fields_set else getattr(defaults, name)

    temperature = req.temperature if req.temperature is not None else defaults.temperature
    seed = req.seed if req.seed is not None else defaults.seed
    if temperature > 0 and seed is None:
        seed = secrets.randbits(63)  # reported in the response, so the reply can be reproduced
    top_k = req.top_k if req.top_k is not None else defaults.top_k
    settings = replace(
        defaults, gen_length=gen_length, block_length=block_length,
        threshold=req.threshold if req.threshold is not None else defaults.threshold,
        editing_threshold=pick("editing_threshold"),
        max_post_steps=req.max_post_steps if req.max_post_steps is not None
        else defaults.max_post_steps,
        temperature=temperature, seed=seed,
        top_p=req.top_p if req.top_p is not None else defaults.top_p,
        top_k=top_k if top_k is None or top_k > 0 else None)
    try:
        settings.validate(max_positions)
    except TideError as exc:  # a backstop: the fields above are range-checked already
        raise bad_request(exc.message) from None
    return settings


def _encode(worker: Worker, prompt_field: str, **kw: Any) -> list[int]:
    try:
        with worker.tokenizer_lock:
            return worker.engine.prompt_ids(**kw)
    except TideError as exc:  # empty prompt, no chat template
        raise bad_request(f"{prompt_field}: {exc.message}", prompt_field) from None


def chat_generation(worker: Worker, req: ChatRequest, defaults: DecodeSettings) -> Generation:
    system, history, prompt = req.turns()
    ids = _encode(worker, "messages", prompt=prompt, system=system, history=history)
    return _generation(worker, req, defaults, ids, "messages")


def completion_generation(worker: Worker, req: CompletionRequest,
                          defaults: DecodeSettings) -> Generation:
    ids = _encode(worker, "prompt", prompt=req.text(), raw=True)
    return _generation(worker, req, defaults, ids, "prompt")


def _generation(worker: Worker, req: Sampling, defaults: DecodeSettings, ids: list[int],
                prompt_field: str) -> Generation:
    settings = settings_for(req, defaults, prompt_tokens=len(ids),
                            max_positions=worker.engine.cfg.max_position_embeddings,
                            prompt_field=prompt_field)
    return Generation(ids=tuple(ids), settings=settings, stops=req.stops(), stream=req.stream)
