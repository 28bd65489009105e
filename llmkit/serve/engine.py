"""The model's one loop: a queue of requests, decoded with continuous batching.

Torch work happens here only (one model, one thread: no locks around the weights). ``llmkit
serve`` runs this loop on the process's main thread (``run``) and the HTTP server beside it: on a
CPU, torch's products are fastest in the thread that loaded the model (docs/serve.md, "Speed"). An
in-process server (tests, ``TestClient``) runs it in a thread of its own (``start``). Requests with
the same decoding settings share a :class:`~llmkit.core.decoding.steps.Slots` batch: one that arrives
while others decode is prefilled and joins them at the next decoding step, up to ``max_batch``
rows; a row leaves when it ends, and its place is taken by the next request. Requests with other
settings wait until the batch drains. Each output is a pure function of its prompt, its settings
and its seed (``row_seed``), never of its neighbours, so a greedy request gives the same text alone
or batched. A request whose client went away stops at the next token.

Results go back through callbacks the caller gives (the API hands them to its event loop).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmkit.core.config import SampleConfig
from llmkit.core.decoding.decoder import Decoder
from llmkit.core.decoding.steps import random_seed, row_seed


@dataclass
class Request:
    """One piece of work: a text to continue (``kind`` 'generate'), texts to embed or classify."""

    kind: str
    prompt_ids: list[int] = field(default_factory=list)
    cfg: SampleConfig | None = None
    seed: int = 0
    texts: list[str] = field(default_factory=list)
    logprobs: bool = False
    structure: Any = None
    """The compiled structure the answer is held to (``core.decoding.structure``), or None."""
    on_text: Callable[[str], None] = lambda text: None
    on_done: Callable[[Any], None] = lambda result: None
    on_error: Callable[[BaseException], None] = lambda error: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    """Characters of text already streamed (a row decoded again after a failed batch skips them)."""
    parts: list = field(default_factory=list)
    """Embeddings or class probabilities of the texts done so far, a part at a time."""

    def stream(self, text: str) -> None:
        self.sent += len(text)
        self.on_text(text)

    def resend_from(self, skip: int) -> Callable[[str], None]:
        """``on_text`` for a second decoding of this request: the first ``skip`` characters were sent."""
        seen = 0

        def on_text(text: str) -> None:
            nonlocal seen
            new = text[max(skip - seen, 0) :]
            seen += len(text)
            if new:
                self.stream(new)

        return on_text


PART = 32
"""Texts embedded or classified per turn of the loop: a long request shares the model with the
decoding batch (one part, one decoding step, …) instead of holding it for minutes."""


class Busy(Exception):
    """More requests are waiting than the server takes (the API answers 503)."""


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        device,
        *,
        max_batch: int = 8,
        max_waiting: int = 64,
        cache_tokens: int = 0,
        embed_cfg=None,
        pooling: str = "last",
    ):
        self.model, self.tok, self.device, self.pooling = model, tokenizer, device, pooling
        self.max_batch, self.max_waiting, self.embed_cfg = max_batch, max_waiting, embed_cfg
        # The shared KV cache covers this many positions (a pretrained model's 8k or 128k context
        # times max_batch rows would cost gigabytes); longer requests are decoded alone.
        self.cache_tokens = min(model.cfg.context, cache_tokens or model.cfg.context)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.held: list[Request] = []  # taken from the queue, waiting for a place in the batch
        self.running: dict[int, Request] = {}  # id(Output) -> its request
        self.slots = None
        self.key = None
        self.stats = {"requests": 0, "largest_batch": 0}
        self._stop = threading.Event()
        self.hosted = False  # True: the caller runs the loop (``run``), and ``start`` starts no thread
        self.thread = threading.Thread(target=self.run, name="llmkit-engine", daemon=True)

    def start(self) -> None:
        """Run the loop in a thread of its own (until ``stop``), unless it runs already or its
        caller runs it (``hosted``)."""
        if not self.hosted and not self.thread.is_alive():
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        if self.waiting.qsize() + len(self.held) >= self.max_waiting:
            raise Busy(f"{self.max_waiting} requests are already waiting")
        self.waiting.put(request)

    @staticmethod
    def seed(given: int | None, sample: int = 0) -> int:
        """A request's seed: ``row_seed(seed, 0, sample)``, as ``llmkit generate --seed`` gives its
        first prompt, so a seeded request answers as the command line does."""
        return row_seed(given if given is not None else random_seed(), 0, sample)

    # --- the thread -------------------------------------------------------------------------------
    def _next(self, timeout: float) -> Request | None:
        if self.held:
            return self.held.pop(0)
        try:
            return self.waiting.get(timeout=timeout)
        except queue.Empty:
            return None

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The loop, on the calling thread: until ``stop`` is called or ``until()`` is true."""
        import torch

        with torch.inference_mode():
            while not self._stop.is_set() and not until():
                try:
                    self._turn()
                except Exception:  # noqa: BLE001 - a failed batch step: its rows are decoded again, alone
                    self._isolate()

    def _isolate(self) -> None:
        """After a batched step fails, decode each of its rows again by itself: an output does not
        depend on its batch, so the rows that can finish get the same text as in the batch (their
        streamed text is not sent twice), and only a row that fails alone hears of the error."""
        rows, self.running, self.slots = list(self.running.values()), {}, None
        for r in rows:
            try:
                self._alone(r, on_text=r.resend_from(r.sent))
            except Exception as e:  # noqa: BLE001 - this row's own failure
                r.on_error(e)

    def _turn(self) -> None:
        """Admit what can join, then one decoding step (or wait for work when there is none)."""
        if (self.slots is None or not self.slots.live) and not self.held:
            first = self._next(0.1)  # nothing to do: wait a moment for work
            if first is None:
                return
            self.held.append(first)
        self._admit()
        if self.slots is not None and self.slots.live:
            for out in self.slots.step():
                self.running.pop(id(out)).on_done(out)

    def _admit(self) -> None:
        """Everything waiting, in order of arrival: each request admitted (or kept for a later
        turn) on its own, so one that fails fails alone."""
        while True:  # everything waiting, in order of arrival
            try:
                self.held.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        keep, failed = [], False
        for r in self.held:
            try:
                if self._admit_one(r):
                    keep.append(r)
            except Exception as e:  # noqa: BLE001 - this request's failure (its prompt, its settings)
                r.on_error(e)
                failed = True
        self.held = keep
        if failed and self.running:  # a failed admission may have left the shared batch half-written
            self._isolate()

    def _admit_one(self, r: Request) -> bool:
        """Put one held request to work (a row of the batch, decoded alone, or a part of its
        embeddings); whether it stays held for a later turn."""
        from dataclasses import replace

        from llmkit.core.decoding.steps import SlotJob, Slots

        if r.cancelled.is_set():
            return False
        if r.kind != "generate":
            return not self._serve_part(r)  # one part of embeddings or classes between two decoding steps
        key = replace(r.cfg, max_new_tokens=1, seed=None)
        if self.slots is None or (not self.slots.live and self.key != key):
            self.slots = Slots(self.model, self.max_batch, r.cfg, eos_id=self.tok.eos_id, decode=self.tok.decode,
                               device=self.device, length=self.cache_tokens)  # fmt: skip
            self.key = key
        if key != self.key or len(r.prompt_ids) + r.cfg.max_new_tokens > self.slots.state.length:
            if not self.slots.live and key == self.key:  # too long to share a cache: alone
                self._alone(r)
                return False
            return True
        job = SlotJob(r.prompt_ids, r.seed, r.cfg.max_new_tokens, on_text=r.stream, cancelled=r.cancelled.is_set,
                      record=r.logprobs, structure=r.structure)  # fmt: skip
        out = self.slots.admit([job])[0]
        if out is None:
            return True  # no free row, or its prompt is longer than the slots decoded so far
        self.running[id(out)] = r
        self.stats["requests"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self.slots.live)
        return False

    def _alone(self, r: Request, on_text: Callable[[str], None] | None = None) -> None:
        """A request decoded by itself: too long for the shared cache (the context slides), or a row
        of a batch that failed."""
        structure = r.structure.structure if r.structure is not None else None
        decoder = Decoder(self.model, self.tok, r.cfg, self.device, structure=structure)
        stream = on_text or r.stream
        out = decoder.decode(
            [r.prompt_ids],
            [r.seed],
            on_text=lambda _, text: stream(text),
            record_probs=r.logprobs,
            cancelled=lambda _: r.cancelled.is_set(),
        )[0]
        self.stats["requests"] += 1
        r.on_done(out)

    def _serve_part(self, r: Request) -> bool:
        """Embed or classify the next ``PART`` texts of a request; whether it is finished (then
        answered). A failure is the request's own."""
        done = sum(len(p[0]) for p in r.parts)
        try:
            r.parts.append(self._embed_or_classify(r.kind, r.texts[done : done + PART]))
            if done + PART < len(r.texts):
                return False
            if r.kind == "embed":
                import numpy as np

                r.on_done((np.concatenate([p[0] for p in r.parts]), sum(p[1] for p in r.parts)))
            else:
                r.on_done(([row for p in r.parts for row in p[0]], sum(p[1] for p in r.parts)))
        except Exception as e:  # noqa: BLE001 - this request's failure, not the loop's
            r.on_error(e)
        return True

    def _embed_or_classify(self, kind: str, texts: list[str]):
        if kind == "embed":
            from llmkit.core.tasks.retrieval import embed_items

            return embed_items(self.model, self.tok, texts, self.embed_cfg, device=self.device)
        if kind == "classify":
            import torch

            from llmkit.core.tasks.objectives import classify_texts

            logits, truncated = classify_texts(self.model, self.tok, texts, pooling=self.pooling, device=self.device)
            return torch.softmax(logits.float(), -1).tolist(), truncated
        raise ValueError(kind)  # pragma: no cover - the API sends only the kinds above
