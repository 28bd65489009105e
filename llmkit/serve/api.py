"""The HTTP API: OpenAI's routes and shapes over one llmkit checkpoint.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``POST /v1/embeddings``, ``POST /v1/classify`` (classifier checkpoints),
``GET /v1/models``, ``GET /health`` and the chat page at ``/``.

OpenAI's fields map to llmkit's settings where they exist (``max_tokens``, ``temperature``,
``top_p``, ``presence_penalty``, ``frequency_penalty``, ``stop``, ``seed``, ``n``, ``logprobs``
/ ``top_logprobs``); llmkit's own knobs ride along under their own names (``top_k``, ``min_p``,
``repetition_penalty``, ``no_repeat_ngram``). A field left out takes llmkit's default (temperature
0.8, top-k 50: what small models need), not OpenAI's. Every error has OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and a 4xx/5xx status; nothing a client sends
takes the server down.
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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.core.config import EmbedConfig, SampleConfig, sample_config
from llmkit.core.errors import LlmkitError
from llmkit.serve.engine import Busy, Engine, Request

OPENAI_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                 "temperature": "temperature", "top_p": "top_p", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "seed": "seed"}
LLMKIT_FIELDS = ("top_k", "min_p", "repetition_penalty", "no_repeat_ngram")
UNSUPPORTED = {"best_of": 1, "echo": False, "suffix": None, "tools": None, "functions": None}


@dataclass
class Limits:
    max_tokens: int = 512
    """The most tokens one request may ask for."""
    max_prompt_tokens: int = 0
    """The longest prompt, in tokens (0: the model's context less one)."""
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 64
    max_n: int = 8


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, kind: type, low: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, not {value!r}", param=key)
    if not math.isfinite(value) or (low is not None and value < low):
        raise ApiError(400, f"'{key}' is out of range: {value!r}", param=key)
    return kind(value)


def sampling(body: dict, limits: Limits, default_max: int) -> SampleConfig:
    """The decoding settings of a request body (unknown llmkit-irrelevant fields are ignored, as
    OpenAI's own server ignores what it does not know)."""
    for key, neutral in UNSUPPORTED.items():
        if body.get(key, neutral) not in (neutral, None):
            raise ApiError(400, f"'{key}' is not supported by llmkit's server", param=key)
    given: dict[str, Any] = {}
    for key, ours in OPENAI_FIELDS.items():
        kind = int if key in ("max_tokens", "max_completion_tokens", "seed") else float
        value = _number(body, key, kind)
        if value is not None:
            given[ours] = value
    for key in LLMKIT_FIELDS:
        value = _number(body, key, int if key in ("top_k", "no_repeat_ngram") else float)
        if value is not None:
            given[key] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings", param="stop")
        given["stop"] = tuple(stops)
    given.setdefault("max_new_tokens", default_max)
    if given["max_new_tokens"] > limits.max_tokens:
        raise ApiError(400, f"'max_tokens' {given['max_new_tokens']} is over this server's limit of "
                            f"{limits.max_tokens}", param="max_tokens")
    seed = given.pop("seed", None)
    try:
        cfg = sample_config({**given, "num_beams": None})
    except LlmkitError as e:
        raise ApiError(400, str(e)) from None
    return SampleConfig(**{**cfg.__dict__, "seed": seed})


class Server:
    """The loaded checkpoint, its engine and what the routes need to answer."""

    def __init__(self, checkpoint: Path, *, device: str = "cpu", max_batch: int = 8, limits: Limits | None = None,
                 api_key: str | None = None, name: str | None = None, quantize: str | None = None):
        from llmkit.core.checkpoint import load_model, read_checkpoint

        ckpt = read_checkpoint(checkpoint)
        self.model, self.ckpt = load_model(ckpt, device)
        if quantize == "int8":  # weight-only int8 linear layers: faster decoding (docs/generate.md)
            from llmkit.core.quantize import quantize_int8

            quantize_int8(self.model)
        self.tok, self.kind = self.ckpt.tokenizer, self.ckpt.kind
        self.limits = limits or Limits()
        self.api_key = api_key
        self.name = name or (self.ckpt.path.parent.name if self.ckpt.path.name in ("best", "last")
                             else self.ckpt.path.name)
        self.context = self.model.cfg.context
        task = self.ckpt.task
        self.template = task.prompt_template if task.uses_template else None
        self.chat_template = "chat" if self.tok.chat_template else self.template
        self.engine = Engine(self.model, self.tok, device, max_batch=max_batch, max_waiting=self.limits.max_concurrent,
                             cache_tokens=self.limits.max_tokens + 512, embed_cfg=EmbedConfig(),
                             pooling=task.pooling if self.kind == "classify" else "last")
        self.in_flight = 0
        self.created = int(time.time())

    # --- prompts ----------------------------------------------------------------------------------
    def _fit(self, ids: list[int]) -> list[int]:
        limit = self.limits.max_prompt_tokens or self.context - 1
        if len(ids) > limit:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server takes at most {limit}", param="prompt",
                           code="context_length_exceeded")
        return ids

    def completion_ids(self, text: str) -> list[int]:
        from llmkit.core.task_data import encode_prompt

        if self.template is not None:  # an instruct or translate checkpoint answers through its template
            return self._fit(encode_prompt(self.tok, self.template, [("user", text)]))
        return self._fit(self.tok.encode_text(text))

    def chat_ids(self, messages: Any) -> list[int]:
        from llmkit.core.task_data import encode_prompt

        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, f"messages[{i}] needs a role (system, user or assistant)", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be text", param="messages")
            turns.append(("system" if m["role"] == "developer" else m["role"], content))
        if turns[-1][0] == "assistant":
            raise ApiError(400, "the last message must not be the assistant's", param="messages")
        try:
            if self.chat_template is not None:
                return self._fit(encode_prompt(self.tok, self.chat_template, turns))
        except LlmkitError as e:
            raise ApiError(400, str(e), param="messages") from None
        return self._fit(self.tok.encode_text("".join(f"{c}\n" for _, c in turns)))  # a plain model continues

    def token_entry(self, step, top: int) -> dict[str, Any]:
        text = self.tok.token_text(step.token)
        return {"token": text, "logprob": math.log(max(step.prob, 1e-45)), "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": self.tok.token_text(t), "logprob": math.log(max(p, 1e-45)),
                                  "bytes": list(self.tok.token_text(t).encode("utf-8"))} for t, p in step.top[:top]]}

    # --- running ----------------------------------------------------------------------------------
    async def run(self, ids: list[int], cfg: SampleConfig, sample: int, logprobs: bool, http_request=None,
                  stream_to: asyncio.Queue | None = None):
        """One output, decoded by the engine; text deltas go to ``stream_to`` as they come."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(fn, value):
            if not done.done():
                fn(value)

        r = Request("generate", prompt_ids=ids, cfg=cfg, seed=Engine.seed(cfg.seed, sample), logprobs=logprobs,
                    on_text=(lambda t: loop.call_soon_threadsafe(stream_to.put_nowait, t)) if stream_to else
                    (lambda t: None),
                    on_done=lambda out: loop.call_soon_threadsafe(settle, done.set_result, out),
                    on_error=lambda e: loop.call_soon_threadsafe(settle, done.set_exception, e))
        self.engine.submit(r)
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(done), timeout=0.25)
                except asyncio.TimeoutError:
                    if http_request is not None and await http_request.is_disconnected():
                        r.cancelled.set()  # the client went away: its row stops at the next token
                        raise asyncio.CancelledError from None
        finally:
            if not done.done():
                r.cancelled.set()

    async def run_other(self, kind: str, texts: list[str]):
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        r = Request(kind, texts=texts,
                    on_done=lambda res: loop.call_soon_threadsafe(done.set_result, res),
                    on_error=lambda e: loop.call_soon_threadsafe(done.set_exception, e))
        self.engine.submit(r)
        return await done


def _texts(value: Any, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise ApiError(400, f"'{name}' must be a string or a non-empty list of strings", param=name)
    return items


def _finish(out) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}.get(out.finish_reason, "stop")


def create_app(server: Server):
    """The FastAPI application over a loaded :class:`Server`."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        server.engine.start()  # its own thread, unless `llmkit serve` runs its loop on the main thread
        yield
        server.engine.stop()  # after uvicorn has let the requests in flight finish

    app = FastAPI(title="llmkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind=kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e):
        return JSONResponse(ApiError(400, "the request body is not valid").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(_, e):  # a bug answers 500 in OpenAI's shape; the server stays up
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):
        """API key, body size and concurrent requests, before any route runs."""
        path = request.url.path
        if server.api_key and path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), server.api_key.encode()):
                return JSONResponse(ApiError(401, "missing or wrong API key (Authorization: Bearer …)",
                                             code="invalid_api_key").body(), status_code=401)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > server.limits.max_body_bytes:
            return JSONResponse(ApiError(413, f"the request body is over {server.limits.max_body_bytes} bytes").body(),
                                status_code=413)
        if request.method == "POST" and server.in_flight >= server.limits.max_concurrent:
            return JSONResponse(ApiError(429, "too many requests in flight: try again shortly",
                                         kind="rate_limit_error").body(), status_code=429)
        server.in_flight += request.method == "POST"
        try:
            return await call_next(request)
        finally:
            server.in_flight -= request.method == "POST"

    async def body_of(request: HttpRequest) -> dict:
        raw = await request.body()
        if len(raw) > server.limits.max_body_bytes:
            raise ApiError(413, f"the request body is over {server.limits.max_body_bytes} bytes")
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def need_lm():
        if server.kind == "classify":
            raise ApiError(400, f"{server.name} is a classifier: POST /v1/classify")

    def n_of(body: dict) -> int:
        n = _number(body, "n", int, 1) or 1
        if n > server.limits.max_n:
            raise ApiError(400, f"'n' is at most {server.limits.max_n} here", param="n")
        return n

    def usage(prompts: list[list[int]], outs) -> dict[str, int]:
        p, c = sum(map(len, prompts)), sum(len(o.ids) for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def wants_usage(body: dict, head: dict) -> dict | None:
        options = body.get("stream_options") or {}
        return head if isinstance(options, dict) and options.get("include_usage") else None

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"

    async def generate_all(jobs, cfg, logprobs, request):
        try:
            return await asyncio.gather(*(server.run(ids, cfg, s, logprobs, request) for ids, s in jobs))
        except Busy as e:
            raise ApiError(503, f"the server is busy ({e})", kind="server_error") from None

    def stream(jobs, cfg, logprobs, request, make_chunk, first=None, usage_chunk=None):
        """Server-sent events: each output's text as it is decoded, then (``stream_options:
        {"include_usage": true}``) a chunk with the usage, then [DONE]."""
        async def events():
            outs = [None] * len(jobs)
            queues = [asyncio.Queue() for _ in jobs]
            tasks = [asyncio.ensure_future(server.run(ids, cfg, s, logprobs, request, q))
                     for (ids, s), q in zip(jobs, queues)]
            try:
                if first:
                    for i in range(len(jobs)):
                        yield sse(first(i))
                pending = set(range(len(jobs)))
                while pending:
                    for i in list(pending):
                        while not queues[i].empty():
                            yield sse(make_chunk(i, queues[i].get_nowait(), None, None))
                        if tasks[i].done():
                            out = tasks[i].result()
                            while not queues[i].empty():
                                yield sse(make_chunk(i, queues[i].get_nowait(), None, None))
                            yield sse(make_chunk(i, "", _finish(out), out))
                            outs[i] = out
                            pending.discard(i)
                    if pending:
                        await asyncio.sleep(0.01)
                if usage_chunk is not None:
                    yield sse({**usage_chunk, "choices": [], "usage": usage([j[0] for j in jobs], outs)})
                yield sse("[DONE]")
            except Busy as e:
                yield sse(ApiError(503, f"the server is busy ({e})", kind="server_error").body())
            finally:
                for t in tasks:
                    t.cancel()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "kind": server.kind, "in_flight": server.in_flight,
                "batches": server.engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "llmkit", "kind": server.kind, "context": server.context}]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await body_of(request)
        need_lm()
        prompts = _texts(body.get("prompt", ""), "prompt")
        cfg = sampling(body, server.limits, 16)
        top = _number(body, "logprobs", int, 0)
        if top is not None and top > 5:
            raise ApiError(400, "'logprobs' is at most 5", param="logprobs")
        n, ids = n_of(body), [server.completion_ids(p) for p in prompts]
        jobs = [(ids[i], s) for i in range(len(prompts)) for s in range(n)]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs_of(out):
            if top is None:
                return None
            return {"tokens": [server.tok.token_text(p.token) for p in out.probs],
                    "token_logprobs": [math.log(max(p.prob, 1e-45)) for p in out.probs],
                    "top_logprobs": [{server.tok.token_text(t): math.log(max(q, 1e-45)) for t, q in p.top[:top]}
                                     for p in out.probs]}

        if body.get("stream"):
            def chunk(i, text, finish, out):
                return {"id": rid, "object": "text_completion", "created": created, "model": server.name,
                        "choices": [{"index": i, "text": text, "finish_reason": finish,
                                     "logprobs": logprobs_of(out) if out is not None else None}]}
            return stream(jobs, cfg, top is not None, request, chunk, usage_chunk=wants_usage(
                body, {"id": rid, "object": "text_completion", "created": created, "model": server.name}))
        outs = await generate_all(jobs, cfg, top is not None, request)
        return {"id": rid, "object": "text_completion", "created": created, "model": server.name,
                "choices": [{"index": i, "text": o.text, "finish_reason": _finish(o), "logprobs": logprobs_of(o)}
                            for i, o in enumerate(outs)], "usage": usage([j[0] for j in jobs], outs)}

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await body_of(request)
        need_lm()
        ids = server.chat_ids(body.get("messages"))
        cfg = sampling(body, server.limits, min(server.limits.max_tokens, server.context - len(ids)))
        want = bool(body.get("logprobs"))
        top = _number(body, "top_logprobs", int, 0) or 0
        if top > 5:
            raise ApiError(400, "'top_logprobs' is at most 5", param="top_logprobs")
        jobs = [(ids, s) for s in range(n_of(body))]
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs_of(out):
            return {"content": [server.token_entry(p, top) for p in out.probs]} if want else None

        if body.get("stream"):
            def head(i):
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name,
                        "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]}

            def chunk(i, text, finish, out):
                choice = {"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish}
                if out is not None and want:
                    choice["logprobs"] = logprobs_of(out)  # the whole answer's, with the last chunk
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name,
                        "choices": [choice]}
            return stream(jobs, cfg, want, request, chunk, first=head, usage_chunk=wants_usage(
                body, {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name}))
        outs = await generate_all(jobs, cfg, want, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": o.text},
                             "finish_reason": _finish(o), "logprobs": logprobs_of(o)} for i, o in enumerate(outs)],
                "usage": usage([j[0] for j in jobs], outs)}

    @app.post("/v1/embeddings")
    async def embeddings(request: HttpRequest):
        body = await body_of(request)
        texts = _texts(body.get("input"), "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
        try:
            vectors, _ = await server.run_other("embed", texts)
        except Busy as e:
            raise ApiError(503, f"the server is busy ({e})", kind="server_error") from None
        tokens = sum(len(server.tok.encode(t)) for t in texts)
        return {"object": "list", "model": server.name,
                "data": [{"object": "embedding", "index": i,
                          # base64: the float32 bytes, little-endian (what the openai client asks for)
                          "embedding": v.tolist() if fmt == "float" else
                          base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classify")
    async def classify(request: HttpRequest):
        body = await body_of(request)
        if server.kind != "classify":
            raise ApiError(400, f"{server.name} is a {server.kind} model, not a classifier: POST /v1/completions")
        texts = _texts(body.get("input"), "input")
        try:
            probs, _ = await server.run_other("classify", texts)
        except Busy as e:
            raise ApiError(503, f"the server is busy ({e})", kind="server_error") from None
        labels = list(server.ckpt.task.labels)
        data = []
        for i, row in enumerate(probs):
            best = max(range(len(row)), key=row.__getitem__)
            data.append({"index": i, "label": labels[best], "probability": row[best],
                         "probabilities": dict(zip(labels, row))})
        return {"object": "list", "model": server.name, "data": data}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("llmkit.serve").joinpath("page.html").read_text(encoding="utf-8")

    return app


__all__ = ["ApiError", "Limits", "Server", "create_app", "sampling"]
