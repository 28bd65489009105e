"""The loaded checkpoint behind the routes: its prompts (core's shared prompt policy), its engine,
and awaiting the engine's answers from the event loop."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmkit.core.config import SampleConfig, embed_settings
from llmkit.core.decoding.decoder import Prompts
from llmkit.core.decoding.structure import Compiled, StructureError, compile_structure
from llmkit.core.decoding.tools import call_text
from llmkit.core.errors import ConfigError, LlmkitError
from llmkit.core.interop.resolve import open_checkpoint, open_model
from llmkit.core.jobs.ann import Ann
from llmkit.core.jobs.embed import IndexFile, check_index, index_settings, model_hash
from llmkit.core.model.quantize import quantize_int8
from llmkit.core.tasks.retrieval import top_k, unit_rows
from llmkit.serve.engine import Busy, Engine, Request
from llmkit.serve.protocol import ApiError, Limits, Shape, busy

ROLES = ("system", "user", "assistant", "developer", "tool")


class Server:
    """The loaded checkpoint, its engine and what the routes need to answer."""

    def __init__(
        self,
        checkpoint: Path,
        *,
        device: str = "cpu",
        max_batch: int = 8,
        limits: Limits | None = None,
        api_key: str | None = None,
        name: str | None = None,
        quantize: str | None = None,
        allowed_hosts: tuple[str, ...] | None = None,
        cors_origins: tuple[str, ...] = (),
        index: Path | None = None,
    ):
        ckpt = open_checkpoint(checkpoint)
        self.model, self.ckpt = open_model(ckpt, device)
        if quantize == "int8":  # weight-only int8 linear layers: faster decoding (docs/generate.md)
            quantize_int8(self.model)
        self.tok, self.kind = self.ckpt.tokenizer, self.ckpt.kind
        self.limits = limits or Limits()
        self.api_key = api_key
        # The names a request's Host may give (None: any; a server beyond loopback has names it cannot know).
        self.allowed_hosts = allowed_hosts
        self.cors_origins = cors_origins  # web pages of other sites allowed to call it (none unless asked)
        self.name = name or (
            self.ckpt.path.parent.name if self.ckpt.path.name in ("best", "last") else self.ckpt.path.name
        )
        self.context = self.model.cfg.context
        task = self.ckpt.task
        # Completions go through the checkpoint's task template; chats through the model's own chat
        # format where it has one: the same policy as `llmkit generate` (and `--chat`).
        self.prompts = Prompts(self.tok, Prompts.template_for(task, self.tok, chat=False))
        self.chat_prompts = Prompts(self.tok, Prompts.template_for(task, self.tok, chat=True))
        self.embed_cfg = embed_settings(task)  # an embedding model's pooling, unit length and prefixes
        self.index = None if index is None else self._open_index(Path(index))
        self.engine = Engine(
            self.model,
            self.tok,
            device,
            max_batch=max_batch,
            max_waiting=self.limits.max_concurrent,
            cache_tokens=self.limits.max_tokens + 512,
            embed_cfg=replace(self.embed_cfg, prefix=""),  # the route puts each text behind its prefix
            pooling=task.pooling if self.kind == "classify" else "last",
        )
        self.in_flight = 0
        self.created = int(time.time())

    def _open_index(self, path: Path) -> IndexFile:
        """The vectors /v1/search searches (and their approximate index), refused at start-up when
        another model, or other settings than this server encodes with, made them."""
        found = IndexFile.open(path)
        check_index(path, found.vectors, found.meta, self.model, model_hash(self.ckpt.path))
        built = index_settings(found.meta)
        for key in ("pooling", "layer", "normalize", "max_length", "prefix", "query_prefix"):
            if getattr(built, key) != getattr(self.embed_cfg, key):
                raise ConfigError(
                    f"index {path} was encoded with {key}={getattr(built, key)!r}; this server encodes with "
                    f"{getattr(self.embed_cfg, key)!r} (encode it again with the defaults)"
                )
        self.ann = Ann(path, found.meta) if "ann" in found.meta else None
        # Exact search: the unit rows made once, not copied and normalised again for every query.
        self.unit = None if self.ann is not None else unit_rows(found.vectors)
        return found

    def search(self, vector, k: int) -> tuple[list[float], list[int]]:
        """The index's k rows nearest a query vector (1, C): through the approximate index when
        there is one, else exact."""
        scores, rows = self.ann.search(vector, k) if self.ann is not None else top_k(vector, self.unit, k)
        return scores[0].tolist(), rows[0].tolist()

    # --- prompts ----------------------------------------------------------------------------------
    def _fit(self, ids: list[int]) -> list[int]:
        limit = self.limits.max_prompt_tokens or self.context - 1
        if len(ids) > limit:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens; this server takes at most {limit}",
                param="prompt",
                code="context_length_exceeded",
            )
        return ids

    def completion_ids(self, text: str) -> list[int]:
        try:
            return self._fit(self.prompts.text(text))
        except LlmkitError as e:  # a lone surrogate, a template that refuses: this request's failure
            raise ApiError(400, str(e), param="prompt") from None

    def chat_ids(self, messages: Any, shape: Shape | None = None) -> list[int]:
        """A conversation's prompt; the tools it may call shown to the model (``Prompts.turns``)."""
        turns = turns_of(messages)
        if (
            not self.chat_prompts.shows_tools
        ):  # a tool's result is news from the user's side for a template without tools
            turns = [("user", f"The function returned: {c}") if r == "tool" else (r, c) for r, c in turns]
        try:
            tools = list(shape.tools) if shape is not None and shape.calls else None
            return self._fit(self.chat_prompts.turns(turns, tools))
        except LlmkitError as e:
            raise ApiError(400, str(e), param="messages") from None

    def compile(self, shape: Shape) -> Compiled | None:
        """The structure a request's answer is held to, compiled for this model's tokenizer; a 400
        naming the fault when the engine cannot compile it."""
        try:
            structure = shape.structure()
            return None if structure is None else compile_structure(structure, self.tok, self.tok.eos_id)
        except StructureError as e:
            param = "tools" if shape.calls else "response_format"
            raise ApiError(400, str(e), param=param, code="invalid_schema") from None

    def token_entry(self, step, top: int) -> dict[str, Any]:
        text = self.tok.token_text(step.token)
        return {
            "token": text,
            "logprob": math.log(max(step.prob, 1e-45)),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {
                    "token": self.tok.token_text(t),
                    "logprob": math.log(max(p, 1e-45)),
                    "bytes": list(self.tok.token_text(t).encode("utf-8")),
                }
                for t, p in step.top[:top]
            ],
        }

    # --- running ----------------------------------------------------------------------------------
    def _submit(self, r: Request) -> None:
        try:
            self.engine.submit(r)
        except Busy as e:
            raise busy(e) from None

    async def run(
        self,
        ids: list[int],
        cfg: SampleConfig,
        sample: int,
        logprobs: bool,
        http_request=None,
        stream_to: asyncio.Queue | None = None,
        structure: Compiled | None = None,
    ):
        """One output, decoded by the engine (held to ``structure``); text deltas go to ``stream_to``
        as they come."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(fn, value):
            if not done.done():
                fn(value)

        r = Request(
            "generate",
            prompt_ids=ids,
            cfg=cfg,
            seed=Engine.seed(cfg.seed, sample),
            logprobs=logprobs,
            structure=structure,
            on_text=(lambda t: loop.call_soon_threadsafe(stream_to.put_nowait, t)) if stream_to else (lambda t: None),
            on_done=lambda out: loop.call_soon_threadsafe(settle, done.set_result, out),
            on_error=lambda e: loop.call_soon_threadsafe(settle, done.set_exception, e),
        )
        self._submit(r)
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

    async def run_all(
        self, jobs: list[tuple[list[int], int]], cfg: SampleConfig, logprobs: bool, http_request, structure=None
    ):
        """Every (prompt ids, sample) job, decoded side by side."""
        return await asyncio.gather(
            *(self.run(ids, cfg, s, logprobs, http_request, structure=structure) for ids, s in jobs)
        )

    async def run_other(self, kind: str, texts: list[str]):
        """Embeddings or class probabilities of ``texts``, from the engine."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        r = Request(
            kind,
            texts=texts,
            on_done=lambda res: loop.call_soon_threadsafe(done.set_result, res),
            on_error=lambda e: loop.call_soon_threadsafe(done.set_exception, e),
        )
        self._submit(r)
        return await done


def turns_of(messages: Any) -> list[tuple[str, str]]:
    """OpenAI's chat messages as (role, text) turns, or a 400 naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role (system, user or assistant)", param="messages")
        content = m.get("content")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if calls:  # an earlier call, written as the model writes one
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      for c in calls):  # fmt: skip
                raise ApiError(400, f"messages[{i}].tool_calls must be a list of calls", param="messages")
            written = "\n".join(call_text(str(c["function"].get("name")), c["function"].get("arguments", {}))
                                for c in calls)  # fmt: skip
            content = (content or "") + written
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            texts = [part.get("text", "") for part in content if isinstance(part, dict)]
            content = "".join(texts) if all(isinstance(t, str) for t in texts) else None
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", param="messages")
        turns.append(("system" if m["role"] == "developer" else m["role"], content))
    if turns[-1][0] == "assistant":
        raise ApiError(400, "the last message must not be the assistant's", param="messages")
    return turns
