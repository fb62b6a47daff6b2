"""The OpenAI-compatible HTTP API over a running `Engine` (FastAPI).

    POST   /v1/completions          POST /v1/chat/completions   ("stream": true → server-sent events)
    GET    /v1/models               POST /v1/adapters           DELETE /v1/adapters/{name}
    GET    /health                  GET  /metrics               (Prometheus text)

`"model"` is the base model's name or a registered adapter's. Handlers never block the event
loop: the engine steps in its own thread and hands tokens over through an asyncio queue.
A client that disconnects mid-stream cancels its request, which frees its batch row at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from loralab.model import adapter_names
from loralab.registry import close_matches
from loralab.serve.engine import Completion, Engine, QueueFull, RequestError, RequestHandle, TokenEvent
from loralab.serve.metrics import ServerMetrics
from loralab.serve.pool import AdapterLoadError, AdapterNotFound
from loralab.serve.protocol import (
    APIError,
    GenerationRequest,
    chunk,
    new_id,
    parse_generation,
    parse_json,
    response,
    sse,
)


def create_app(engine: Engine, tokenizer, base_name: str, metrics: ServerMetrics | None = None) -> FastAPI:
    """The app serving `engine` (already started, or stepped by someone else) as `base_name` + its adapters."""
    app = FastAPI(title="loralab", summary="OpenAI-compatible multi-adapter LoRA server")
    metrics = metrics or ServerMetrics()
    app.state.metrics = metrics
    pool = engine.pool

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, f"invalid request: {err.errors()}").body(), status_code=400)

    def resolve_model(name: str) -> str | None:
        if name == base_name:
            return None
        if name in engine.attached or (pool is not None and name in pool):
            return name
        available = [base_name, *engine.adapter_names()]
        hint = close_matches(name, available)
        shown = ", ".join(available[:20]) + (f", … ({len(available)} in all; GET /v1/models)" if len(available) > 20
                                            else "")
        raise APIError(404, f"model {name!r} does not exist" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                       + f" Available: {shown}", param="model", code="model_not_found")

    async def generate(request: Request, chat: bool) -> Any:
        req = parse_generation(parse_json(await request.body()), chat, tokenizer, engine.max_len, resolve_model)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event: TokenEvent | Completion) -> None:  # in the engine's thread
            if isinstance(event, TokenEvent):
                metrics.token()
            else:
                metrics.finished(event.finish_reason, len(event.prompt_ids))
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = engine.submit(req.prompt_ids, req.adapter, req.params, on_event=on_event)
        except QueueFull as err:
            raise APIError(429, str(err), code="queue_full") from None
        except RequestError as err:
            raise APIError(400, str(err)) from None
        request_id = new_id(chat)
        if req.stream:
            return StreamingResponse(_stream(request_id, req, handle, events), media_type="text/event-stream")
        try:
            event = await events.get()
            while not isinstance(event, Completion):
                event = await events.get()
        finally:
            _cancel_unfinished(handle)
        if event.finish_reason == "error":
            raise _failed(event.error or "")
        return response(request_id, req, event.text, event.finish_reason, len(event.token_ids))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": base_name, "object": "model", "created": 0, "owned_by": "loralab"}]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "loralab", "parent": base_name}
                 for n in engine.adapter_names()]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(request: Request) -> dict[str, Any]:
        if pool is None:
            raise APIError(400, "this server has no adapter pool (start it with --adapters DIR)")
        body = parse_json(await request.body())
        name, path = body.get("name"), body.get("path")
        for field, value in (("name", name), ("path", path)):
            if not isinstance(value, str) or not value:
                raise APIError(400, f"field '{field}' must be a non-empty string", param=field)
        await asyncio.to_thread(_register_checked, pool, name, path, base_name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "loralab", "parent": base_name}

    @app.delete("/v1/adapters/{name:path}")
    async def remove_adapter(name: str) -> dict[str, Any]:
        if name in engine.attached:
            raise APIError(409, f"adapter {name!r} is attached to the served model (a method the pool's slots do "
                                "not hold) and stays while the server runs", param="name")
        if pool is None or name not in pool:
            raise APIError(404, f"no adapter named {name!r} is registered", param="name", code="model_not_found")
        try:
            pool.remove(name)
        except AdapterNotFound as err:  # removed by another request meanwhile
            raise APIError(404, str(err), param="name") from None
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": base_name, "running": engine.running(), "waiting": engine.waiting(),
                "adapters": len(engine.adapter_names())}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    return app


async def _stream(request_id: str, req: GenerationRequest, handle: RequestHandle, events: asyncio.Queue):
    """Server-sent events for one request: chunks as tokens come, a final chunk, then [DONE]."""
    try:
        if req.chat:
            yield sse(chunk(request_id, req, "", first=True))
        while True:
            event = await events.get()
            if isinstance(event, TokenEvent):
                if event.text:
                    yield sse(chunk(request_id, req, event.text))
                continue
            if event.finish_reason == "error":
                yield sse(_failed(event.error or "").body())
            else:
                yield sse(chunk(request_id, req, "", event.finish_reason))
            break
        yield sse("[DONE]")
    finally:  # the client went away (or the stream ended): free the batch row now
        _cancel_unfinished(handle)


def _cancel_unfinished(handle: RequestHandle) -> None:
    if not handle.done:  # cancel takes the engine's step lock: not on the event loop's thread
        asyncio.get_running_loop().run_in_executor(None, handle.cancel)


def _failed(message: str) -> APIError:
    """The API error for a request the engine failed (its adapter would not load, or its batch failed)."""
    if "cannot be loaded" in message:
        return APIError(422, message, param="model", code="adapter_load_failed")
    if message.startswith("unknown adapter"):
        return APIError(404, message, param="model", code="model_not_found")
    return APIError(500, message)


def _register_checked(pool, name: str, path: str, base_name: str) -> None:
    """Register adapter `name` from `path` (under the pool's root) only if its files fit the base model."""
    if name in pool or name == base_name or name in adapter_names(pool.model):
        raise APIError(409, f"the name {name!r} is taken: delete that adapter first or choose another name",
                       param="name")
    folder = Path(path) if Path(path).is_absolute() else pool.root / path
    if not folder.resolve().is_relative_to(pool.root):
        raise APIError(400, f"path {path!r} lies outside the adapter root {pool.root}; only folders under it are "
                            "served", param="path", code="path_outside_root")
    try:
        pool.register(name, folder)
    except FileNotFoundError as err:
        raise APIError(404, str(err), param="path") from None
    except ValueError as err:
        raise APIError(422, str(err), param="path") from None
    try:
        pool.verify(name)
    except AdapterLoadError as err:
        pool.remove(name)
        raise APIError(422, str(err), param="path", code="adapter_load_failed") from None
