"""The HTTP API: OpenAI's routes and shapes over one llmkit checkpoint.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``POST /v1/embeddings``, ``POST /v1/classify`` (classifier checkpoints),
``POST /v1/search`` (the nearest items of ``--index``), ``GET /v1/models``, ``GET /health`` and the
chat page at ``/``. ``protocol.py`` owns the request fields and response shapes, ``server.py`` the
model, its prompts and its engine; this module wires them into FastAPI: the error handlers, the
guard every request passes, and the routes. Nothing a client sends takes the server down.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import math
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.serve.protocol import (
    ApiError,
    HeldText,
    Limits,
    chat_message,
    finish_reason,
    n_of,
    number,
    sampling,
    shape_of,
    sse,
    texts,
    top_logprobs,
    usage,
    wants_usage,
)
from llmkit.serve.server import Server

ChunkFn = Callable[[int, str, Any, Any], dict | None]
"""(choice index, text delta, finish reason or None, the finished output or None) -> a chunk (None:
nothing to send yet)."""

INPUT_TYPES = ("query", "document", "passage")
"""/v1/embeddings' input_type: a search query, or a text of the collection (the default)."""
MAX_TOP_K = 100
"""/v1/search's largest top_k."""


def create_app(server: Server) -> FastAPI:
    """The FastAPI application over a loaded :class:`Server`."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        server.engine.start()  # its own thread, unless `llmkit serve` runs its loop on the main thread
        yield
        server.engine.stop()  # after uvicorn has let the requests in flight finish

    app = FastAPI(title="llmkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    _add_error_handlers(app)
    app.add_middleware(GuardMiddleware, guard=Guard(server))
    if server.cors_origins:  # off unless asked: a browser then lets those pages read the answers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(server.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    routes = Routes(server)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat)
    app.post("/v1/embeddings")(routes.embeddings)
    app.post("/v1/classify")(routes.classify)
    app.post("/v1/search")(routes.search)
    app.get("/", response_class=HTMLResponse)(routes.page)
    return app


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; a bug answers 500 and the server stays up."""

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(ApiError(e.status_code, str(e.detail), kind=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e):
        return _error(ApiError(400, "the request body is not valid"))


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _host_name(host: str) -> str:
    """'name' of a Host header 'name:port' ('[::1]:8000' -> '[::1]')."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cross_site(host: str, origin: str | None, allowed_hosts: tuple[str, ...] | None) -> str:
    """Why a request must be refused as coming from elsewhere, or "" to serve it.

    A web page the user opens may send requests to a server on this machine: its ``Origin`` then
    names the page's site, not this server (cross-site request), or it reached a loopback server
    through a name of its own that resolves to 127.0.0.1 (DNS rebinding: ``Host`` is not one of the
    server's names). llama.cpp's and Ollama's servers check the same two headers."""
    if allowed_hosts is not None and _host_name(host).lower() not in allowed_hosts:
        return f"Host {host!r} is not a name of this server: refused (a page reaching it through another name)"
    if origin and origin != "null":
        netloc = origin.split("://", 1)[-1].rstrip("/").lower()
        if netloc != host.lower() and _host_name(netloc) not in (allowed_hosts or ()):
            return f"a request from the web page {origin!r} is refused: this server answers its own pages only"
    return ""


class Guard:
    """API key, body size and concurrent requests, before any route runs."""

    def __init__(self, server: Server):
        self.server = server

    def refusal(self, request: HttpRequest) -> ApiError | None:
        server = self.server
        origin = request.headers.get("origin")
        if origin in server.cors_origins:
            origin = None  # a page of a site the server was told to answer (--cors-origin)
        refused = cross_site(request.headers.get("host", ""), origin, server.allowed_hosts)
        if refused:
            return ApiError(403, refused, kind="permission_error")
        if server.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), server.api_key.encode()):
                return ApiError(401, "missing or wrong API key (Authorization: Bearer …)", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > server.limits.max_body_bytes:
            return ApiError(413, f"the request body is over {server.limits.max_body_bytes} bytes")
        if request.method == "POST" and server.in_flight >= server.limits.max_concurrent:
            return ApiError(429, "too many requests in flight: try again shortly", kind="rate_limit_error")
        return None


class GuardMiddleware:
    """``Guard`` as a plain ASGI middleware, around the routes: refusals answered before any route
    runs, the requests in flight counted, and a bug answered as a 500 here, so that Starlette's
    outermost error middleware, which re-raises to the server after answering (and uvicorn then
    drops the kept-alive connection), never sees it: a 500 leaves its connection usable."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = HttpRequest(scope)
        refused = self.guard.refusal(request)
        if refused is not None:
            await _error(refused)(scope, receive, send)
            return
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        counted = scope["method"] == "POST"
        self.guard.server.in_flight += counted
        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - a bug is this request's 500, never the connection's end
            if started:
                raise  # a response already under way can only be cut short
            await _error(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))(
                scope, receive, send
            )
        finally:
            self.guard.server.in_flight -= counted


def stream(
    server: Server,
    jobs,
    cfg,
    logprobs: bool,
    request: HttpRequest,
    make_chunk: ChunkFn,
    first: Callable[[int], dict] | None = None,
    usage_head: dict | None = None,
    structure=None,
) -> StreamingResponse:
    """Server-sent events: each output's text as it is decoded, then (``usage_head`` given) a chunk
    with the usage, then [DONE]."""

    def chunks(i, text, finish, out):
        chunk = make_chunk(i, text, finish, out)
        return [] if chunk is None else [sse(chunk)]

    async def events():
        outs = [None] * len(jobs)
        queues = [asyncio.Queue() for _ in jobs]
        tasks = [
            asyncio.ensure_future(server.run(ids, cfg, s, logprobs, request, q, structure=structure))
            for (ids, s), q in zip(jobs, queues)
        ]
        try:
            for i in range(len(jobs) if first else 0):
                yield sse(first(i))
            pending = set(range(len(jobs)))
            while pending:
                for i in list(pending):
                    while not queues[i].empty():
                        for event in chunks(i, queues[i].get_nowait(), None, None):
                            yield event
                    if tasks[i].done():
                        out = tasks[i].result()
                        while not queues[i].empty():
                            for event in chunks(i, queues[i].get_nowait(), None, None):
                                yield event
                        for event in chunks(i, "", finish_reason(out), out):
                            yield event
                        outs[i] = out
                        pending.discard(i)
                if pending:
                    await asyncio.sleep(0.01)
            if usage_head is not None:
                yield sse({**usage_head, "choices": [], "usage": usage([j[0] for j in jobs], outs)})
            yield sse("[DONE]")
        except ApiError as e:  # the engine's queue was full
            yield sse(e.body())
        finally:
            for t in tasks:
                t.cancel()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


class Routes:
    """The routes over one server; each parses, asks the server, and shapes the answer."""

    def __init__(self, server: Server):
        self.server = server

    async def body_of(self, request: HttpRequest) -> dict:
        limit = self.server.limits.max_body_bytes
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a form or text/plain body is what a cross-site page can send unasked
            raise ApiError(
                415, f"the request body must be JSON (Content-Type: application/json, not {kind or 'none'!r})"
            )
        parts: list[bytes] = []

        async def read() -> None:
            size = 0
            async for part in request.stream():  # counted while read: a chunked upload has no Content-Length
                size += len(part)
                if size > limit:
                    raise ApiError(413, f"the request body is over {limit} bytes")
                parts.append(part)

        seconds = self.server.limits.body_seconds
        try:
            await asyncio.wait_for(read(), timeout=seconds)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {seconds:g} s") from None
        raw = b"".join(parts)
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise ApiError(400, "the request body nests too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def need_lm(self) -> None:
        if self.server.kind == "classify":
            raise ApiError(400, f"{self.server.name} is a classifier: POST /v1/classify")

    def head(self, prefix: str, kind: str) -> dict[str, Any]:
        """The fields every response and chunk of one request shares."""
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": kind,
            "created": int(time.time()),
            "model": self.server.name,
        }

    async def health(self):
        s = self.server
        return {"status": "ok", "model": s.name, "kind": s.kind, "in_flight": s.in_flight, "batches": s.engine.stats}

    async def models(self):
        s = self.server
        return {
            "object": "list",
            "data": [
                {
                    "id": s.name,
                    "object": "model",
                    "created": s.created,
                    "owned_by": "llmkit",
                    "kind": s.kind,
                    "context": s.context,
                }
            ],
        }

    async def completions(self, request: HttpRequest):
        server, body = self.server, await self.body_of(request)
        self.need_lm()
        prompts = texts(body.get("prompt", ""), "prompt")
        cfg = sampling(body, server.limits, 16)
        structure = await asyncio.to_thread(
            server.compile, shape_of(body, chat=False)
        )  # off the event loop: a first compile reads the vocabulary
        top = top_logprobs(body, "logprobs")
        n, ids = n_of(body, server.limits), [server.completion_ids(p) for p in prompts]
        jobs = [(ids[i], s) for i in range(len(prompts)) for s in range(n)]
        head = self.head("cmpl", "text_completion")

        def logprobs_of(out):
            if top is None or out is None:
                return None
            tok = server.tok
            return {
                "tokens": [tok.token_text(p.token) for p in out.probs],
                "token_logprobs": [math.log(max(p.prob, 1e-45)) for p in out.probs],
                "top_logprobs": [
                    {tok.token_text(t): math.log(max(q, 1e-45)) for t, q in p.top[:top]} for p in out.probs
                ],
            }

        def choice(i, text, finish, out):
            return {"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs_of(out)}

        if body.get("stream"):
            return stream(
                server,
                jobs,
                cfg,
                top is not None,
                request,
                lambda *a: {**head, "choices": [choice(*a)]},
                usage_head=head if wants_usage(body) else None,
                structure=structure,
            )
        outs = await server.run_all(jobs, cfg, top is not None, request, structure)
        return {
            **head,
            "choices": [choice(i, o.text, finish_reason(o), o) for i, o in enumerate(outs)],
            "usage": usage([j[0] for j in jobs], outs),
        }

    async def chat(self, request: HttpRequest):
        server, body = self.server, await self.body_of(request)
        self.need_lm()
        shape = shape_of(body, chat=True)
        ids = server.chat_ids(body.get("messages"), shape)
        cfg = sampling(body, server.limits, min(server.limits.max_tokens, server.context - len(ids)))
        structure = await asyncio.to_thread(server.compile, shape)
        want, top = bool(body.get("logprobs")), top_logprobs(body, "top_logprobs") or 0
        jobs = [(ids, s) for s in range(n_of(body, server.limits))]
        head = self.head("chatcmpl", "chat.completion.chunk" if body.get("stream") else "chat.completion")

        def logprobs_of(out):
            return {"content": [server.token_entry(p, top) for p in out.probs]} if want else None

        if body.get("stream"):
            chunk = self.chat_chunks(head, shape, len(jobs), logprobs_of if want else None)

            def opening(i):
                return {
                    **head,
                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }

            return stream(server, jobs, cfg, want, request, chunk, first=opening,
                          usage_head=head if wants_usage(body) else None, structure=structure)  # fmt: skip
        outs = await server.run_all(jobs, cfg, want, request, structure)
        choices = []
        for i, o in enumerate(outs):
            message, finish = chat_message(o.text, shape, finish_reason(o))
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": logprobs_of(o)})
        return {**head, "choices": choices, "usage": usage([j[0] for j in jobs], outs)}

    @staticmethod
    def chat_chunks(head: dict, shape, n: int, logprobs_of) -> ChunkFn:
        """The streamed chunks of a chat answer: content deltas as they come; when the answer may be
        a tool call, text held until it cannot begin one, and a call sent whole with the last chunk."""
        held = [HeldText() for _ in range(n)]

        def chunk(i, text, finish, out):
            if shape.calls:
                text = held[i].push(text)
            delta: dict[str, Any] = {"content": text} if text else {}
            if out is not None and shape.calls:
                message, finish = chat_message(out.text, shape, finish)
                if "tool_calls" in message:
                    delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]}
                elif not held[i].free and held[i].seen:
                    delta = {"content": held[i].seen}  # a short answer that looked like a call's start
            if not delta and finish is None:
                return None
            choice = {"index": i, "delta": delta, "finish_reason": finish}
            if out is not None and logprobs_of is not None:
                choice["logprobs"] = logprobs_of(out)  # the whole answer's, with the last chunk
            return {**head, "choices": [choice]}

        return chunk

    async def embeddings(self, request: HttpRequest):
        server, body = self.server, await self.body_of(request)
        items = texts(body.get("input"), "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
        # An embedding model reads a question and a passage differently: input_type (as in Cohere's
        # and Voyage's APIs) says which; documents by default, as OpenAI's API has no such field.
        kind = body.get("input_type") or "document"
        if kind not in INPUT_TYPES:
            raise ApiError(400, f"input_type must be one of {', '.join(INPUT_TYPES)}", param="input_type")
        cfg = server.embed_cfg
        items = [(cfg.query_prefix if kind == "query" else cfg.prefix) + t for t in items]
        vectors, _ = await server.run_other("embed", items)
        tokens = sum(len(server.tok.encode(t)) for t in items)
        return {
            "object": "list",
            "model": server.name,
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    # base64: the float32 bytes, little-endian (what the openai client asks for)
                    "embedding": v.tolist()
                    if fmt == "float"
                    else base64.b64encode(v.astype("<f4").tobytes()).decode("ascii"),
                }
                for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def search(self, request: HttpRequest):
        """The items of the server's --index nearest a query, encoded behind the query prefix."""
        server, body = self.server, await self.body_of(request)
        if server.index is None:
            raise ApiError(400, "this server has no index to search: start it with llmkit serve … --index VECTORS")
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ApiError(400, "'query' must be a non-empty string", param="query")
        k = number(body, "top_k", int, 1) or 5
        if k > MAX_TOP_K:
            raise ApiError(400, f"'top_k' is at most {MAX_TOP_K}", param="top_k")
        vectors, _ = await server.run_other("embed", [server.embed_cfg.query_prefix + query])
        scores, rows = await asyncio.to_thread(server.search, vectors, k)  # a read of the index: off the event loop
        hits = [{"rank": i, "score": round(s, 6), "id": r, "text": server.index.texts[r]}
                for i, (s, r) in enumerate(zip(scores, rows), 1)]  # fmt: skip
        return {"object": "list", "model": server.name, "data": hits}

    async def classify(self, request: HttpRequest):
        server, body = self.server, await self.body_of(request)
        if server.kind != "classify":
            raise ApiError(400, f"{server.name} is a {server.kind} model, not a classifier: POST /v1/completions")
        probs, _ = await server.run_other("classify", texts(body.get("input"), "input"))
        labels = list(server.ckpt.task.labels)
        data = []
        for i, row in enumerate(probs):
            best = max(range(len(row)), key=row.__getitem__)
            data.append(
                {"index": i, "label": labels[best], "probability": row[best], "probabilities": dict(zip(labels, row))}
            )
        return {"object": "list", "model": server.name, "data": data}

    async def page(self):
        return resources.files("llmkit.serve").joinpath("page.html").read_text(encoding="utf-8")


__all__ = ["LOOPBACK", "ApiError", "Limits", "Server", "create_app", "cross_site", "number", "sampling"]
