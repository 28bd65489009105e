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
    on_text: Callable[[str], None] = lambda text: None
    on_done: Callable[[Any], None] = lambda result: None
    on_error: Callable[[BaseException], None] = lambda error: None
    cancelled: threading.Event = field(default_factory=threading.Event)


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
                except Exception as e:  # a bug must not take the server down: each caller hears of it
                    for r in list(self.running.values()) + self.held:
                        r.on_error(e)
                    self.running, self.held, self.slots = {}, [], None

    def _turn(self) -> None:
        """Admit what can join, then one decoding step (or wait for work when there is none)."""
        if self.slots is None or not self.slots.live:
            first = self._next(0.1)
            if first is None:
                return
            if first.cancelled.is_set():
                return
            if first.kind != "generate":
                self._serve_one(first)
                return
            self.held.insert(0, first)
        self._admit()
        if self.slots is not None and self.slots.live:
            for out in self.slots.step():
                self.running.pop(id(out)).on_done(out)

    def _admit(self) -> None:
        from dataclasses import replace

        from llmkit.core.decoding.steps import SlotJob, Slots

        while True:  # everything waiting, in order of arrival
            try:
                self.held.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        keep = []
        for r in self.held:
            if r.cancelled.is_set():
                continue
            if r.kind != "generate":
                self._serve_one(r)  # embeddings and classification between two decoding steps
                continue
            key = replace(r.cfg, max_new_tokens=1, seed=None)
            if self.slots is None or (not self.slots.live and self.key != key):
                self.slots, self.key = (
                    Slots(
                        self.model,
                        self.max_batch,
                        r.cfg,
                        eos_id=self.tok.eos_id,
                        decode=self.tok.decode,
                        device=self.device,
                        length=self.cache_tokens,
                    ),
                    key,
                )
            if key != self.key or len(r.prompt_ids) + r.cfg.max_new_tokens > self.slots.state.length:
                if not self.slots.live and key == self.key:  # too long to share a cache: alone
                    self._alone(r)
                else:
                    keep.append(r)
                continue
            job = SlotJob(
                r.prompt_ids,
                r.seed,
                r.cfg.max_new_tokens,
                on_text=r.on_text,
                cancelled=r.cancelled.is_set,
                record=r.logprobs,
            )
            out = self.slots.admit([job])[0]
            if out is None:
                keep.append(r)  # no free row, or its prompt is longer than the slots decoded so far
            else:
                self.running[id(out)] = r
                self.stats["requests"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], self.slots.live)
        self.held = keep

    def _alone(self, r: Request) -> None:
        """A request too long for the shared cache: decoded by itself (the context slides)."""
        decoder = Decoder(self.model, self.tok, r.cfg, self.device)
        out = decoder.decode(
            [r.prompt_ids],
            [r.seed],
            on_text=lambda _, text: r.on_text(text),
            record_probs=r.logprobs,
            cancelled=lambda _: r.cancelled.is_set(),
        )[0]
        self.stats["requests"] += 1
        r.on_done(out)

    def _serve_one(self, r: Request) -> None:
        try:
            if r.kind == "embed":
                from llmkit.core.jobs.embed import embed_items

                vectors, truncated = embed_items(self.model, self.tok, r.texts, self.embed_cfg, device=self.device)
                r.on_done((vectors, truncated))
            elif r.kind == "classify":
                import torch

                from llmkit.core.tasks.objectives import classify_texts

                logits, truncated = classify_texts(
                    self.model, self.tok, r.texts, pooling=self.pooling, device=self.device
                )
                r.on_done((torch.softmax(logits.float(), -1).tolist(), truncated))
            else:  # pragma: no cover - the API sends only the kinds above
                raise ValueError(r.kind)
        except Exception as e:
            r.on_error(e)
