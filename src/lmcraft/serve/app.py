"""The OpenAI-compatible endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions` (JSON or server-sent
events ending in `data: [DONE]`), plus `GET /metrics` (batches decoded, rows, largest batch). Bad requests answer
400, a wrong bearer key 401 and a full queue 429, all in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`. FastAPI is imported here only (the `serve` extra)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmcraft.generate import encode_prompts
from lmcraft.serve.batcher import Batcher, Job, QueueFull


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be a number from {low} to {high}, got {value!r}.", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer from {low} to {high}, got {value!r}.", name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them.", "stop")
    return tuple(stops)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects.", "messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise BadRequest(f"messages[{i}] must be an object with 'role' (system, user or assistant) and a "
                             "string 'content'.", f"messages[{i}]")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _prompts(body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise BadRequest("'prompt' must be a non-empty string or a list of them.", "prompt")
    return prompts


def build_app(model: Any, tokenizer: Any, eos_ids: list[int], *, model_name: str, template: str | None,
              api_key: str | None, max_queue: int, max_batch: int, system: str | None = None,
              compile: bool | str = "auto") -> FastAPI:
    """The FastAPI app serving `model`; its worker task runs while the app is up. `system` is put before chat
    requests that bring no system message of their own; `compile` is `GenerationConfig.compile` for every batch."""
    batcher = Batcher(model, tokenizer, eos_ids, max_queue, max_batch, compile)
    context = model.config.max_position_embeddings

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.work())
        yield
        worker.cancel()

    app = FastAPI(title="lmcraft", lifespan=lifespan)

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lmcraft"}]}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {**batcher.stats, "queued": batcher.queue.qsize()}

    async def answer(request: Request, chat: bool) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "The body is not valid JSON.", "invalid_request_error")
        try:
            if not isinstance(body, dict):
                raise BadRequest("The body must be a JSON object.")
            prompts = [_messages(body)] if chat else _prompts(body)
            limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
            max_tokens = _integer(body, limit, 16 if not chat else 128, 1, context)
            temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
            top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
            n = _integer(body, "n", 1, 1, max_batch)
            seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1)
            stop = _stop(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("'stream' must be true or false.", "stream")
            ids = encode_prompts(tokenizer, prompts, chat=chat, system=system, template=template)
            for i, row in enumerate(ids):
                if not row or len(row) + max_tokens > context:
                    raise BadRequest(f"prompt {i} has {len(row)} tokens; with {limit}={max_tokens} it must fit the "
                                     f"model's context of {context} tokens.", "messages" if chat else "prompt")
        except BadRequest as err:
            return error(400, str(err), "invalid_request_error", err.param)
        assert max_tokens is not None and n is not None
        job = Job(rows=[row for row in ids for _ in range(n)], max_tokens=max_tokens, stop=stop,
                  temperature=temperature, top_p=top_p, seed=seed, loop=asyncio.get_running_loop())
        try:
            batcher.submit(job)
        except QueueFull:
            return error(429, f"The server's queue is full ({max_queue} requests); retry later.",
                         "rate_limit_exceeded", code="queue_full")
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": model_name}
        prompt_tokens = sum(len(row) for row in ids)
        if stream:
            return StreamingResponse(_events(job, head, chat), media_type="text/event-stream")
        return await _collect(job, head, chat, prompt_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, chat=False)

    return app


def _choice(chat: bool, index: int, text: str | None, reason: str | None, delta: bool) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    if delta:
        return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": reason}


async def _collect(job: Job, head: dict[str, Any], chat: bool, prompt_tokens: int) -> Any:
    """The whole answer as one JSON object with `usage`."""
    texts = [""] * len(job.rows)
    reasons: list[str | None] = [None] * len(job.rows)
    completion = 0
    while (event := await job.events.get())[0] != "end":
        if event[0] == "error":
            return error(500, event[1], "server_error")
        if event[0] == "delta":
            texts[event[1]] += event[2]
        else:
            reasons[event[1]] = event[2]
            completion += event[3]
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [_choice(chat, i, t, r, delta=False)
                        for i, (t, r) in enumerate(zip(texts, reasons, strict=True))],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


async def _events(job: Job, head: dict[str, Any], chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta, one per finished choice, then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        choice = _choice(chat, index, text, reason, delta=True)
        if role:
            choice["delta"]["role"] = "assistant"
        return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"

    if chat:
        for index in range(len(job.rows)):
            yield chunk(index, "", None, role=True)
    while (event := await job.events.get())[0] != "end":
        if event[0] == "error":
            yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
            break
        if event[0] == "delta":
            yield chunk(event[1], event[2], None)
        else:
            yield chunk(event[1], None, event[2])
    yield "data: [DONE]\n\n"
