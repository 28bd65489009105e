"""The model's one thread: a queue of requests, decoded in batches.

Torch work happens here only (one model, one thread: no locks around the weights). A request
waiting when the thread is free starts a batch; for a few milliseconds more, requests with the
same decoding settings join it, up to ``max_batch``. Each output is a pure function of its prompt,
its settings and its seed (``row_seed``), never of its batch, so a greedy request gives the same
text alone or batched. A request whose client went away stops at the next token.

Results go back through a callback the caller gives (the API hands them to its event loop).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from llmkit.core.config import SampleConfig
from llmkit.core.decoding import Decoder
from llmkit.core.generate import Output, random_seed, row_seed


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
    def __init__(self, model, tokenizer, device, *, max_batch: int = 8, max_waiting: int = 64,
                 gather_s: float = 0.005, embed_cfg=None, pooling: str = "last"):
        self.model, self.tok, self.device, self.pooling = model, tokenizer, device, pooling
        self.max_batch, self.max_waiting, self.gather_s = max_batch, max_waiting, gather_s
        self.embed_cfg = embed_cfg
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.held: list[Request] = []  # taken from the queue but not batchable yet
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
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

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                first = self._next(0.1)
                if first is None:
                    continue
                if first.cancelled.is_set():
                    continue
                if first.kind != "generate":
                    self._serve_one(first)
                    continue
                batch = self._gather(first)
                try:
                    self._decode(batch)
                except Exception as e:  # a bug must not take the server down: each caller hears of it
                    for r in batch:
                        r.on_error(e)

    def _gather(self, first: Request) -> list[Request]:
        """``first`` and the requests that can share its batch, waiting ``gather_s`` for more."""
        batch, deadline = [first], time.perf_counter() + self.gather_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                r = self.waiting.get(timeout=max(left, 0.0)) if left > 0 else self.waiting.get_nowait()
            except queue.Empty:
                break
            if r.kind == "generate" and r.cfg == first.cfg and r.logprobs == first.logprobs:
                batch.append(r)
            else:
                self.held.append(r)
        return batch

    def _decode(self, batch: list[Request]) -> None:
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        decoder = Decoder(self.model, self.tok, batch[0].cfg, self.device)  # prompts come encoded
        outs: list[Output] = decoder.decode([r.prompt_ids for r in batch], [r.seed for r in batch],
                                            on_text=lambda row, text: batch[row].on_text(text),
                                            record_probs=batch[0].logprobs,
                                            cancelled=lambda row: batch[row].cancelled.is_set())
        for r, out in zip(batch, outs):
            r.on_done(out)

    def _serve_one(self, r: Request) -> None:
        try:
            if r.kind == "embed":
                from llmkit.core.embed import embed_items

                vectors, truncated = embed_items(self.model, self.tok, r.texts, self.embed_cfg, device=self.device)
                r.on_done((vectors, truncated))
            elif r.kind == "classify":
                import torch

                from llmkit.core.tasks import classify_texts

                logits, truncated = classify_texts(self.model, self.tok, r.texts, pooling=self.pooling,
                                                   device=self.device)
                r.on_done((torch.softmax(logits.float(), -1).tolist(), truncated))
            else:  # pragma: no cover - the API sends only the kinds above
                raise ValueError(r.kind)
        except Exception as e:
            r.on_error(e)
