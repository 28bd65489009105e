"""OpenAI's protocol, as llmkit's server speaks it: request fields to decoding settings, errors
and response shapes.

OpenAI's fields map to llmkit's settings where they exist (``max_tokens``, ``temperature``,
``top_p``, ``presence_penalty``, ``frequency_penalty``, ``stop``, ``seed``, ``n``, ``logprobs``
/ ``top_logprobs``); llmkit's own knobs ride along under their own names (``top_k``, ``min_p``,
``repetition_penalty``, ``no_repeat_ngram``). A field left out takes llmkit's default (temperature
0.8, top-k 50: what small models need), not OpenAI's. Every error has OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and a 4xx/5xx status.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from llmkit.core.config import SampleConfig, sample_config
from llmkit.core.decoding.structure import Structure, StructureError
from llmkit.core.decoding.tools import OPEN, Tool, parse_calls, read_tools, tool_structure
from llmkit.core.errors import LlmkitError

OPENAI_FIELDS = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
}
LLMKIT_FIELDS = ("top_k", "min_p", "repetition_penalty", "no_repeat_ngram")
UNSUPPORTED = {"best_of": 1, "echo": False, "suffix": None, "functions": None}


@dataclass
class Limits:
    max_tokens: int = 512
    """The most tokens one request may ask for."""
    max_prompt_tokens: int = 0
    """The longest prompt, in tokens (0: the model's context less one)."""
    max_body_bytes: int = 1 << 20
    body_seconds: float = 30.0
    """The longest a client may take to send its body: a stalled upload holds a place among the
    requests in flight, so 64 of them locked every other client out with 429s."""
    max_concurrent: int = 64
    max_n: int = 8


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def number(body: dict, key: str, kind: type, low: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
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
        value = number(body, key, kind)
        if value is not None:
            given[ours] = value
    for key in LLMKIT_FIELDS:
        value = number(body, key, int if key in ("top_k", "no_repeat_ngram") else float)
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
        raise ApiError(
            400,
            f"'max_tokens' {given['max_new_tokens']} is over this server's limit of {limits.max_tokens}",
            param="max_tokens",
        )
    seed = given.pop("seed", None)
    try:
        cfg = sample_config({**given, "num_beams": None})
        return SampleConfig(**{**cfg.__dict__, "seed": seed})
    except LlmkitError as e:  # every field's range is checked here: a request's failure is its own
        raise ApiError(400, str(e)) from None


def texts(value: Any, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise ApiError(400, f"'{name}' must be a string or a non-empty list of strings", param=name)
    return items


def finish_reason(out) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}.get(out.finish_reason, "stop")


def n_of(body: dict, limits: Limits) -> int:
    n = number(body, "n", int, 1) or 1
    if n > limits.max_n:
        raise ApiError(400, f"'n' is at most {limits.max_n} here", param="n")
    return n


def top_logprobs(body: dict, key: str) -> int | None:
    top = number(body, key, int, 0)
    if top is not None and top > 5:
        raise ApiError(400, f"'{key}' is at most 5", param=key)
    return top


def usage(prompts: list[list[int]], outs) -> dict[str, int]:
    p, c = sum(map(len, prompts)), sum(len(o.ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def wants_usage(body: dict) -> bool:
    """``stream_options: {"include_usage": true}``: a last chunk with the usage."""
    options = body.get("stream_options") or {}
    return isinstance(options, dict) and bool(options.get("include_usage"))


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def busy(e: Exception) -> ApiError:
    """The engine's queue is full: 503, the one answer for every route."""
    return ApiError(503, f"the server is busy ({e})", kind="server_error")


@dataclass(frozen=True)
class Shape:
    """What a request asks its answer to be: a structure (``response_format``), and the tools it
    may call (``tools``, ``tool_choice``)."""

    answer: Structure | None = None
    tools: tuple[Tool, ...] = ()
    choice: str = "none"
    parallel: bool = True

    @property
    def calls(self) -> bool:
        """Whether the answer may be a tool call."""
        return bool(self.tools) and self.choice != "none"

    def structure(self) -> Structure | None:
        """Everything the answer is held to, as one structure (None: free text)."""
        if not self.calls:
            return self.answer
        return tool_structure(list(self.tools), self.choice, self.answer, parallel=self.parallel)


def shape_of(body: dict, *, chat: bool) -> Shape:
    """``response_format`` and (chat only) ``tools`` / ``tool_choice`` / ``parallel_tool_calls``."""
    try:
        answer = _response_format(body.get("response_format"))
        if body.get("tools") is None:
            if body.get("tool_choice") not in (None, "none", "auto"):
                raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
            return Shape(answer)
        if not chat:
            raise ApiError(400, "'tools' belong to /v1/chat/completions", param="tools")
        tools = read_tools(body["tools"])
    except StructureError as e:
        raise ApiError(400, str(e), param="tools" if body.get("tools") is not None else "response_format") from None
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        choice = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, str):
        raise ApiError(400, "'tool_choice' must be auto, none, required or {'type': 'function', 'function': "
                       "{'name': ...}}", param="tool_choice")  # fmt: skip
    if choice not in ("auto", "none", "required") and choice not in {t.name for t in tools}:
        raise ApiError(400, f"'tool_choice' names {choice!r}, which is not one of the tools", param="tool_choice")
    return Shape(answer, tuple(tools), choice, body.get("parallel_tool_calls") is not False)


def _response_format(value: Any) -> Structure | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Structure.json_object("response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be {'name': ..., 'schema': {...}}",
                           param="response_format")  # fmt: skip
        return Structure.json_schema(spec.get("schema", {}), "response_format.json_schema")
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format")


def chat_message(text: str, shape: Shape, finish: str) -> tuple[dict[str, Any], str]:
    """The assistant's message of an answer (its tool calls read out of the text), and its finish reason."""
    content, calls = parse_calls(text) if shape.calls else (text, [])
    if not calls:
        return {"role": "assistant", "content": text}, finish
    tool_calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]
    return {"role": "assistant", "content": content or None, "tool_calls": tool_calls}, "tool_calls"


class HeldText:
    """Streaming an answer that may be a tool call: text is held while it could still begin one
    (``<tool_call>``), then sent as it comes if it does not; a call is sent whole at the end, as
    ``tool_calls`` deltas."""

    def __init__(self):
        self.seen, self.free = "", False

    def push(self, text: str) -> str:
        """The part of ``text`` that can be shown now."""
        if self.free:
            return text
        self.seen += text
        if OPEN.startswith(self.seen) or self.seen.startswith(OPEN):
            return ""
        self.free = True
        return self.seen
