"""Tool calls (function calling): the tools a model may call, the structure its answer must then
have, and the calls read back out of its text.

A call is written the way most chat templates with a tool format write it (Qwen, Hermes, SmolLM3):
``<tool_call>{"name": "...", "arguments": {...}}</tool_call>``, one per call. The arguments are held
to the tool's own JSON schema by the grammar engine (``structure.py``), so a call always parses and
names a tool that exists. ``choice`` follows OpenAI's ``tool_choice``:

- ``auto``: a call, or a plain answer (which then may not begin with ``<``, the one character that
  could start a call), or, with a response structure, an answer in that structure;
- ``required``: one call or more; a tool's name: one call of that tool;
- ``none``: no call (the tools are not shown to the model).

A model whose chat template has no tool format is told about the tools in a system message
(``instructions``); one whose template reads ``tools`` renders them its own way.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llmkit.core.decoding.structure import JSON_STYLE, Structure, StructureError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL_RE = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: str
    """The JSON schema of its arguments, as JSON text."""

    def as_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": json.loads(self.parameters)}}  # fmt: skip


def read_tools(value: Any, source: str = "tools") -> list[Tool]:
    """OpenAI's ``tools`` list (``[{"type": "function", "function": {name, description, parameters}}]``)."""
    if not isinstance(value, list) or not value:
        raise StructureError(f"{source} must be a non-empty list of functions")
    tools = []
    for i, item in enumerate(value):
        fn = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME_RE.match(fn["name"]):
            raise StructureError(f"{source}[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}} "
                                 "with a name of letters, digits, _ or - (64 at most)")  # fmt: skip
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise StructureError(f"{source}[{i}].function.parameters must be a JSON schema (an object)")
        tools.append(Tool(fn["name"], str(fn.get("description") or ""), json.dumps(params)))
    if len({t.name for t in tools}) < len(tools):
        raise StructureError(f"{source}: two tools have the same name")
    return tools


def tool_structure(tools: list[Tool], choice: str, answer: Structure | None = None, *, parallel: bool = True):
    """The structure of an answer under ``choice`` (auto | required | none | a tool's name), or None
    when nothing constrains it (``none`` with no ``answer`` structure)."""
    if choice == "none":
        return answer
    named = [t for t in tools if t.name == choice]
    if choice not in ("auto", "required") and not named:
        raise StructureError(f"tool_choice names {choice!r}, which is not one of the tools")
    called = named or tools

    def schema(t: Tool) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)},
                "required": ["name", "arguments"], "additionalProperties": False}  # fmt: skip

    one = {"anyOf": [schema(t) for t in called]} if len(called) > 1 else schema(called[0])
    style = f', "x-guidance": {json.dumps(JSON_STYLE)}'  # the one JSON style of structure.py, inside %json
    lines = [
        f"call: {json.dumps(OPEN)} %json {json.dumps(one)[:-1]}{style}}} {json.dumps(CLOSE)}",
        'calls: call ("\\n" call)*' if parallel and not named else "calls: call",
    ]
    if choice != "auto":
        return Structure.lark("\n".join(["start: calls", *lines]), "tool_choice")
    if answer is None:
        lines.append(r"TEXT: /[^<](?s:.)*/")  # a plain answer: anything that cannot begin a call
        return Structure.lark("\n".join(["start: calls | TEXT", *lines]), "tools")
    if answer.kind not in ("json_schema", "json_object"):
        raise StructureError("tools with tool_choice 'auto' combine with a JSON response_format only")
    body = answer.spec if answer.kind == "json_schema" else '{"type": "object"}'
    lines.append(f"answer: %json {body[:-1]}{style}}}")
    return Structure.lark("\n".join(["start: calls | answer", *lines]), "tools")


def instructions(tools: list[Tool]) -> str:
    """A system message describing the tools, for a model whose chat template has no tool format."""
    listed = "\n".join(json.dumps(t.as_openai()["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call these functions:\n"
        f"{listed}\n"
        f'To call one, answer only with {OPEN}{{"name": "function name", "arguments": {{...}}}}{CLOSE}.'
    )


def reads_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders the ``tools`` it is given (its own tool format)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


@dataclass
class Call:
    id: str
    name: str
    arguments: str
    """The arguments as JSON text (what OpenAI's API returns)."""


def parse_calls(text: str) -> tuple[str, list[Call]]:
    """The text before any call, and the calls written in ``text`` (none when it is a plain answer).
    A block that is not a call (no JSON, no name) stays text."""
    calls = []
    for m in CALL_RE.finditer(text):
        try:
            body = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(body, dict) and isinstance(body.get("name"), str):
            args = body.get("arguments", {})
            calls.append(Call(f"call_{uuid.uuid4().hex[:24]}", body["name"], json.dumps(args, ensure_ascii=False)))
    if not calls:
        return text, []
    return text[: text.find(OPEN)].strip(), calls


def call_text(name: str, arguments: Any) -> str:
    """An earlier call as the model writes it (an assistant turn of the conversation so far)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return f"{OPEN}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{CLOSE}"
