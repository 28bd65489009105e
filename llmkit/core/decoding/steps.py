"""Decoding: batched prefill + cached decode, beam search, stop strings, incremental text.

- ``decode_batch`` decodes many prompts together, in gpt-fast's shape: prefill (one forward pass
  over the prompts), choose a token per row (``Rows.choose``: penalties, filters, each row's own
  generator), step (one forward pass of T=1), until every row has ended. Prompts are left-padded; each row gets its own
  rotary positions and a mask that hides its padding, so a prompt's output does not depend on
  what it is batched with (greedy: identical tokens; sampling: each row draws from its own
  generator, seeded by ``row_seed`` from the seed, the prompt's index and the sample's).
- The KV cache is preallocated once for the whole context and written in place; prefill is one
  forward pass; each new token is one forward pass of T=1. When the context is full, the window
  slides: the cache is rebuilt from the most recent half-context of tokens and decoding goes on.
- ``beam_search`` keeps num_beams hypotheses in the batch dimension and reorders the cache rows.
- ``TextStream`` turns tokens into text incrementally, ends the output exactly before a stop string
  (also when it is split across tokens) and holds back text that might begin one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmkit.core.config import SampleConfig
from llmkit.core.decoding.sampling import NGramIndex, pick, process_logits, token_counts
from llmkit.core.decoding.structure import Compiled, Matcher, constrain
from llmkit.core.model import fast
from llmkit.core.model.transformer import KVCache, Transformer, pad_batch

TOP_ALTERNATIVES = 5


@dataclass
class StepProbs:
    """One generated token with its probability and the most likely alternatives (for --show-probs)."""

    token: int
    prob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "eos" | "stop" | "length" | "cancelled"
    truncated_prompt: bool = False
    seconds: float = 0.0
    probs: list[StepProbs] = field(default_factory=list)
    score: float | None = None  # beam search: the length-normalised log-probability
    drafted: int = 0  # speculative decoding: tokens guessed, and how many the model kept
    accepted: int = 0
    complete: bool | None = None
    """Structured outputs: whether the text is a whole valid answer (False: the budget ran out
    inside it); None when no structure was asked for."""

    @property
    def tokens_per_s(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


def fit_prompt(ids: list[int], context: int) -> tuple[list[int], bool]:
    """Keep the most recent context - 1 tokens of a prompt (room for one new token)."""
    if len(ids) < context:
        return ids, False
    return ids[-(context - 1) :], True


class TextStream:
    """Incremental detokenization with stop strings.

    ``push(token)`` returns the text that became safe to show. Text is held back while it ends in
    an incomplete UTF-8 sequence (byte-fallback tokens) or in something that may begin a stop
    string; once a stop string appears, the text ends just before it and ``stopped`` is set.
    Work per token is bounded: only a short tail of tokens is re-decoded.
    """

    COMMIT_EVERY = 16

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self.decode, self.stops = (lambda ids: drop_invalid(decode(ids))), tuple(stops)
        self.committed = ""  # text of tokens no longer re-decoded
        self.pending: list[int] = []
        self.shown = 0  # characters handed out so far
        self.stopped = False
        self.longest_stop = max((len(s) for s in self.stops), default=0)

    @property
    def text(self) -> str:
        """The whole output; an incomplete UTF-8 sequence at its very end (decoding stopped
        between the bytes of one character) is left out."""
        full = self.committed + self.decode(self.pending)
        return self._cut(full.rstrip(REPLACEMENT))[0]

    def _cut(self, full: str) -> tuple[str, bool]:
        start = max(0, self.shown - self.longest_stop)
        hits = [i for i in (full.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            return full[: min(hits)], True
        return full, False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending.append(token)
        tail = self.decode(self.pending)
        full, self.stopped = self._cut(self.committed + tail)
        if self.stopped:
            out = full[self.shown :]
            self.shown = len(full)
            return out
        if len(self.pending) >= self.COMMIT_EVERY and not tail.endswith(REPLACEMENT):
            self.committed += tail
            self.pending = []
        safe = len(full.rstrip(REPLACEMENT))  # an incomplete UTF-8 sequence waits for its next bytes
        hold = 0
        for stop in self.stops:  # hold back the longest suffix that may begin a stop string
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if full[safe - k : safe] == stop[:k]:
                    hold = max(hold, k)
                    break
        safe = max(safe - hold, self.shown)
        out = full[self.shown : safe]
        self.shown = safe
        return out

    def flush(self) -> str:
        """The rest of the text once decoding has ended (nothing more can complete a stop string)."""
        full = self.text
        out = full[self.shown :]
        self.shown = len(full)
        return out


REPLACEMENT = "\ufffd"


def drop_invalid(text: str) -> str:
    """Text decoded from generated ids, without the U+FFFD marks of byte sequences that are not
    UTF-8 (a small model can emit byte-fallback tokens in an impossible order): they carry no
    character, and a reader should never see them. A trailing run is kept: it may be the start of a
    character whose next bytes are still to come (``TextStream`` holds it back until then)."""
    head = text.rstrip(REPLACEMENT)
    return head.replace(REPLACEMENT, "") + text[len(head) :]


def _record(processed: torch.Tensor, chosen: torch.Tensor) -> list[StepProbs]:
    probs = torch.softmax(processed, dim=-1)  # (B, V) the distribution the token was drawn from
    top_p, top_i = probs.topk(min(TOP_ALTERNATIVES, probs.size(-1)), dim=-1)  # (B, K)
    out = []
    for b in range(probs.size(0)):
        t = int(chosen[b])
        out.append(StepProbs(t, float(probs[b, t]), list(zip(top_i[b].tolist(), top_p[b].tolist()))))
    return out


def row_seed(base: int, prompt: int, sample: int = 0) -> int:
    """The seed of one output row: a function of (base seed, prompt index, sample index) only, so
    an output never depends on what it is batched with. The one seeding rule of decoding."""
    return base + 1_000_003 * prompt + sample


def random_seed() -> int:
    """A fresh base seed when the user gave none."""
    return int.from_bytes(os.urandom(4), "little")


class DecodeState:
    """The KV cache and bookkeeping of rows decoded together (left-padded).

    ``prefill`` writes the prompts at slots [0, P); each ``step`` writes one token per row at the
    next slot. Both return the next-token logits (B, V). ``key_valid`` (B, L) marks the slots that
    hold real tokens, so padding is never attended to; ``pad`` (B,) counts each row's masked-out
    slots so far, and a token's rotary position is its slot minus its row's ``pad``.
    ``extra`` slots past the context leave room for masked-out slots inside rows (``keep``).
    """

    def __init__(self, model: Transformer, batch_size: int, device, length: int | None = None, *, extra: int = 0):
        self.model, self.device = model, device
        fast.for_decoding(model)  # decoding multiplies few rows by every weight: the faster layout here
        # Only as many slots as this decoding can fill: a pretrained model's context (8k, 128k)
        # would otherwise cost gigabytes of cache per row.
        self.length = min(model.cfg.context, length or model.cfg.context) + extra
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(model.cfg, batch_size, self.length, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch_size, self.length, dtype=torch.bool, device=device)  # (B, L)
        self.slot = 0
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) padding slots per row
        self.padded = False

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Fill slots [0, P) with left-padded rows; return the last logits (B, V)."""
        ids, valid, positions = pad_batch(rows, "left", self.device)  # each (B, P)
        P = ids.size(1)
        self.pad = P - valid.sum(1)  # (B,) padding slots before each row's text
        self.key_valid.zero_()
        self.key_valid[:, :P] = valid
        self.padded = not bool(valid.all())
        self.slot = P
        logits = self.model(
            ids,
            cache=self.cache,
            pos=0,
            positions=positions if self.padded else None,
            key_valid=self.key_valid if self.padded else None,
            last_only=True,
        )
        return logits[:, -1]  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) at the next slot; return the next logits (B, V)."""
        return self.feed(tokens[:, None], last_only=True)[:, -1]

    def feed(self, tokens: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """Feed T tokens per row (B, T) at the next T slots; the logits after each (B, T, V), or
        after the last only. Speculative decoding checks its guesses this way, then ``rewind``s."""
        s, T = self.slot, tokens.size(1)
        self.key_valid[:, s : s + T] = True
        positions = None
        if self.padded:
            # Clamped: filler tokens after a row's real ones (``keep`` drops them) may run past
            # the context; a real token's position never does.
            positions = ((s - self.pad)[:, None] + torch.arange(T, device=tokens.device)).clamp(
                max=self.model.cfg.context - 1
            )  # (B, T)
        logits = self.model(
            tokens,
            cache=self.cache,
            pos=s,
            positions=positions,
            key_valid=self.key_valid if self.padded else None,
            last_only=last_only,
        )
        self.slot = s + T
        return logits

    def rewind(self, slot: int) -> None:
        """Forget every slot from ``slot`` on: the causal mask already hides them from earlier
        queries, and the next tokens overwrite them (rolling back costs nothing)."""
        self.key_valid[:, slot:] = False
        self.slot = slot

    def keep(self, start: int, counts: list[int]) -> None:
        """Of the slots fed since ``start``, keep the first ``counts[b]`` of each row b and mask
        out the rest: rows that fed together can keep different numbers of tokens (speculative
        decoding). Equal counts rewind instead, so nothing is masked out."""
        if len(set(counts)) == 1:
            self.rewind(start + counts[0])
            return
        T = self.slot - start
        n = torch.tensor(counts, device=self.device)  # (B,)
        dropped = torch.arange(T, device=self.device)[None, :] >= n[:, None]  # (B, T)
        self.key_valid[:, start : self.slot] &= ~dropped
        self.pad += T - n
        self.padded = True

    def select(self, rows: list[int]) -> None:
        """Keep only batch rows ``rows``, in that order: rows that have ended stop costing work."""
        i = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.select(i)
        self.key_valid, self.pad = self.key_valid[i], self.pad[i]  # (b, L), (b,)

    @property
    def full(self) -> bool:
        return self.slot >= self.length


class Rows:
    """Per-row decoding state: outputs, text streams, who is still going, the token history that
    penalties and no-repeat-n-gram read, and each row's random generator."""

    def __init__(
        self,
        rows: list[list[int]],
        outs: list[Output],
        cfg: SampleConfig,
        vocab: int,
        decode: Callable[[list[int]], str],
        seeds: list[int],
        device,
        structure: Compiled | None = None,
    ):
        B = len(rows)
        self.cfg, self.outs = cfg, outs
        self.matchers: list[Matcher] | None = [structure.matcher() for _ in range(B)] if structure else None
        self.history = [list(r) for r in rows]  # every row's full token list, for penalties and sliding
        self.streams = [TextStream(decode, cfg.stop) for _ in range(B)]
        self.alive = torch.ones(B, dtype=torch.bool, device=device)
        self.gens = None if cfg.greedy else [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.counts = None
        if cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty:
            ids, valid, _ = pad_batch(rows, "left", device)  # each (B, P)
            self.counts = token_counts(ids, valid, vocab)  # (B, V)
        self.ngrams = [NGramIndex(cfg.no_repeat_ngram, r) for r in rows] if cfg.no_repeat_ngram else None

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits (B, V) -> (the processed logits, the chosen token of each row (B,)).
        A structure masks the tokens that would break it first, so penalties and filters only
        ever choose among valid ones."""
        if self.matchers is not None:
            alive = self.alive.tolist()
            logits = constrain(logits, [m if alive[b] else None for b, m in enumerate(self.matchers)])
        banned = [g.banned() for g in self.ngrams] if self.ngrams else None
        processed = process_logits(logits, self.cfg, counts=self.counts, banned=banned)
        if self.gens is None:
            return processed, pick(processed, 0.0)
        return processed, torch.stack(
            [pick(processed[b : b + 1], self.cfg.temperature, g)[0] for b, g in enumerate(self.gens)]
        )

    def push(
        self, b: int, t: int, eos_id: int | None, prob: StepProbs | None, on_text: Callable[[int, str], None] | None
    ) -> bool:
        """Append token t to row b: the row ends (False) at EOS or a stop string; new text streams."""
        out = self.outs[b]
        if eos_id is not None and t == eos_id:
            self.alive[b] = False
            out.finish_reason = "eos"
            return False
        out.ids.append(t)
        self.history[b].append(t)
        if self.ngrams:
            self.ngrams[b].add(t)
        if prob is not None:
            out.probs.append(prob)
        shown = self.streams[b].push(t)
        if on_text and shown:
            on_text(b, shown)
        if self.streams[b].stopped:
            self.alive[b] = False
            out.finish_reason = "stop"
            return False
        if self.matchers is not None:
            matcher = self.matchers[b]
            matcher.accept(t)
            if matcher.stopped:  # the answer is whole and nothing may follow: no step spent on the end
                self.alive[b] = False
                out.finish_reason = "stop"
                return False
        return True

    def advance(
        self,
        tokens: torch.Tensor,
        eos_id: int | None,
        probs: list[StepProbs] | None,
        on_text: Callable[[int, str], None] | None,
    ) -> None:
        """Append each live row's token (``push``)."""
        for b, t in enumerate(tokens.tolist()):
            if self.alive[b]:
                self.push(b, t, eos_id, probs[b] if probs is not None else None, on_text)
        if self.counts is not None:
            B = tokens.size(0)
            self.counts[torch.arange(B, device=tokens.device), tokens] += self.alive.float()

    def finish(self, seconds: float, on_text: Callable[[int, str], None] | None) -> None:
        for b, out in enumerate(self.outs):
            rest = self.streams[b].flush()
            if on_text and rest:
                on_text(b, rest)
            out.text = self.streams[b].text
            out.seconds = seconds
            if self.matchers is not None:
                out.complete = self.matchers[b].complete and not self.matchers[b].error


@torch.inference_mode()
def decode_batch(
    model: Transformer,
    prompts: list[list[int]],
    cfg: SampleConfig,
    *,
    eos_id: int | None,
    decode: Callable[[list[int]], str],
    device: torch.device | str = "cpu",
    seeds: list[int] | None = None,
    record_probs: bool = False,
    on_text: Callable[[int, str], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    structure: Compiled | None = None,
) -> list[Output]:
    """Greedy or sampled decoding of several prompts at once (see the module docstring).

    ``seeds`` gives each row its own generator (default: ``row_seed(cfg.seed, row)``); ``on_text(row,
    text)`` receives each row's newly visible text as it is decoded, for streaming; a row for which
    ``cancelled(row)`` turns true stops there (finish_reason "cancelled": its client went away);
    ``structure`` keeps every row's text inside it (``structure.py``).
    """
    context = model.cfg.context
    window = max(context // 2, 1)
    outs, rows = [], []
    for p in prompts:
        ids, truncated = fit_prompt(p or [eos_id if eos_id is not None else 0], context)
        outs.append(Output(prompt_ids=list(ids), truncated_prompt=truncated))
        rows.append(list(ids))
    if seeds is None:
        base = cfg.seed if cfg.seed is not None else random_seed()
        seeds = [row_seed(base, b) for b in range(len(rows))]
    state = Rows(rows, outs, cfg, model.cfg.vocab_size, decode, seeds, device, structure)
    t0 = time.perf_counter()
    batch = DecodeState(model, len(rows), device, max(map(len, rows)) + cfg.max_new_tokens)
    logits = batch.prefill(rows)
    for _ in range(cfg.max_new_tokens):
        processed, tokens = state.choose(logits)
        state.advance(tokens, eos_id, _record(processed, tokens) if record_probs else None, on_text)
        if cancelled is not None:
            for b in range(len(rows)):
                if state.alive[b] and cancelled(b):
                    state.alive[b] = False
                    outs[b].finish_reason = "cancelled"
        if not bool(state.alive.any()):
            break
        if batch.full:
            # Slide: rebuild the cache from each row's most recent half-context and go on.
            logits = batch.prefill([h[-window:] for h in state.history])
        else:
            logits = batch.step(tokens)
    state.finish(time.perf_counter() - t0, on_text)
    return outs


@dataclass
class SlotJob:
    """A request for :class:`Slots`: its prompt, seed, budget, and what to tell whom."""

    ids: list[int]
    seed: int
    max_new: int
    on_text: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None
    record: bool = False
    """Keep each token's probability and alternatives (``Output.probs``)."""
    structure: Compiled | None = None
    """The shape the answer must have (structured outputs)."""


@dataclass
class _Slot:
    """One row of a :class:`Slots` batch: its own decoding state (a one-row ``Rows``), output,
    token budget and callbacks."""

    rows: Rows
    out: Output
    limit: int
    on_text: Callable[[str], None] | None
    cancelled: Callable[[], bool] | None
    record: bool
    t0: float


class Slots:
    """Continuous batching: rows join between two decoding steps and leave when they end.

    One KV cache of ``capacity`` rows over the model's context. While nothing decodes, the rows
    waiting start together (one left-padded prefill, as ``decode_batch``). While rows decode, a new
    one is prefilled alone and its keys and values are copied into a free row so that its prompt
    ends at the current slot (its positions still start at 0: rotary positions are in the keys);
    the next step then feeds it with everyone else. A row whose prompt is longer than the slots
    decoded so far, or whose budget would pass the end of the cache, waits until the batch drains.
    Every row keeps its own penalties, filters and generator (``Rows`` of one row, seeded like
    ``decode_batch``'s), so an output does not depend on its neighbours.
    """

    def __init__(
        self,
        model: Transformer,
        capacity: int,
        cfg: SampleConfig,
        *,
        eos_id: int | None,
        decode: Callable[[list[int]], str],
        device: torch.device | str = "cpu",
        length: int | None = None,
    ):
        self.model, self.cfg, self.eos_id, self.decode_fn, self.device = model, cfg, eos_id, decode, device
        self.state = DecodeState(model, capacity, device, length)  # its cache, mask and slot; Slots steps itself
        self.state.pad = torch.zeros(capacity, dtype=torch.long, device=device)  # (B,)
        self.slots: list[_Slot | None] = [None] * capacity
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)  # (B,) each row's last token

    @property
    def live(self) -> int:
        """Rows decoding: always the first ``live`` rows of the cache (kept packed)."""
        return sum(s is not None for s in self.slots)

    def fits(self, n_prompt: int, max_new: int) -> bool:
        """Whether a prompt of ``n_prompt`` tokens asking ``max_new`` can join now."""
        if None not in self.slots:
            return False
        if not self.live:
            return n_prompt + max_new <= self.state.length
        return n_prompt <= self.state.slot and self.state.slot + max_new <= self.state.length

    def _slot(self, job: SlotJob) -> _Slot:
        out = Output(prompt_ids=list(job.ids))
        rows = Rows(
            [job.ids],
            [out],
            self.cfg,
            self.model.cfg.vocab_size,
            self.decode_fn,
            [job.seed],
            self.device,
            job.structure,
        )
        return _Slot(rows, out, job.max_new, job.on_text, job.cancelled, job.record, time.perf_counter())

    @torch.inference_mode()
    def admit(self, jobs: list[SlotJob]) -> list[Output | None]:
        """Start the ``jobs`` that fit, in order; the Output of each one admitted (None for those
        that must wait). A job may end at once (its first token is EOS): :meth:`step` reports it
        with the others."""
        taken: list[Output | None] = []
        if not self.live:
            start = []
            for job in jobs:
                if len(start) < len(self.slots) and len(job.ids) + job.max_new <= self.state.length:
                    start.append(self._slot(job))
                    taken.append(start[-1].out)
                else:
                    taken.append(None)
            if start:  # one left-padded prefill of the first len(start) rows
                st, k = self.state, len(start)
                ids, valid, positions = pad_batch([s.out.prompt_ids for s in start], "left", self.device)  # (k, P)
                P = ids.size(1)
                st.key_valid.zero_()
                st.key_valid[:k, :P] = valid
                st.pad[:k] = P - valid.sum(1)
                st.slot = P
                logits = self.model(
                    ids,
                    cache=_CacheRows(st.cache, k),
                    pos=0,
                    positions=positions,
                    key_valid=st.key_valid[:k],
                    last_only=True,
                )[:, -1]  # (k, V)
                for b, slot in enumerate(start):
                    self.slots[b] = slot
                    self._advance(b, logits[b : b + 1])
            return taken
        for job in jobs:
            ids = job.ids
            if not self.fits(len(ids), job.max_new):
                taken.append(None)
                continue
            b = self.live  # the rows stay packed: a newcomer goes right after the last live one
            s, P = self.state.slot, len(ids)
            alone = DecodeState(self.model, 1, self.device, P)
            logits = alone.prefill([ids])  # (1, V): exactly the prompt's own prefill
            cache = self.state.cache
            cache.k[:, b, :, s - P : s] = alone.cache.k[:, 0, :, :P]  # (n_layer, G, P, D)
            cache.v[:, b, :, s - P : s] = alone.cache.v[:, 0, :, :P]
            self.state.key_valid[b] = False
            self.state.key_valid[b, s - P : s] = True
            self.state.pad[b] = s - P  # position = slot - pad: the prompt sits at positions 0..P-1
            self.slots[b] = self._slot(job)
            taken.append(self.slots[b].out)
            self._advance(b, logits)
        return taken

    def _advance(self, b: int, logits: torch.Tensor) -> None:
        """Row ``b``'s next token from its logits (1, V): chosen, recorded, streamed."""
        slot = self.slots[b]
        processed, token = slot.rows.choose(logits)  # (1, V), (1,)
        slot.rows.advance(
            token,
            self.eos_id,
            _record(processed, token) if slot.record else None,
            (lambda _, text: slot.on_text(text)) if slot.on_text else None,
        )
        self.tokens[b] = token[0]

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """End the rows that are done, then one decoding step for the rest; the outputs ended."""
        ended = self._reap()
        n = self.live
        if n:
            # One token for each live row, over the first n rows of the cache only: a batch of one
            # costs what decoding alone does, however many rows the cache could hold.
            st, s = self.state, self.state.slot
            st.key_valid[:n, s] = True
            logits = self.model(
                self.tokens[:n, None],
                cache=_CacheRows(st.cache, n),
                pos=s,
                positions=(s - st.pad[:n])[:, None],
                key_valid=st.key_valid[:n],
                last_only=True,
            )[:, -1]  # (n, V)
            st.slot = s + 1
            for b in range(n):
                self._advance(b, logits[b : b + 1])
            ended += self._reap()
        if not self.live:
            self.state.slot = 0
        return ended

    def _move(self, src: int, dst: int) -> None:
        """Row ``src`` (its cache, mask, positions, token, state) into the free row ``dst``."""
        st = self.state
        st.cache.k[:, dst] = st.cache.k[:, src]  # (n_layer, G, L, D)
        st.cache.v[:, dst] = st.cache.v[:, src]
        st.key_valid[dst] = st.key_valid[src]
        st.pad[dst] = st.pad[src]
        self.tokens[dst] = self.tokens[src]
        self.slots[dst], self.slots[src] = self.slots[src], None

    def _reap(self) -> list[Output]:
        ended = []
        for b, slot in enumerate(self.slots):
            if slot is None:
                continue
            out = slot.out
            if bool(slot.rows.alive[0]) and slot.cancelled is not None and slot.cancelled():
                slot.rows.alive[0] = False
                out.finish_reason = "cancelled"
            elif bool(slot.rows.alive[0]) and len(out.ids) >= slot.limit:
                slot.rows.alive[0] = False
                out.finish_reason = "length"
            if not bool(slot.rows.alive[0]):
                stream = (lambda _, text, fn=slot.on_text: fn(text)) if slot.on_text else None
                slot.rows.finish(time.perf_counter() - slot.t0, stream)
                ended.append(out)
                self.slots[b] = None
        live = [b for b, slot in enumerate(self.slots) if slot is not None]
        for dst, src in enumerate(live):  # pack the survivors into the first rows, in order
            if src != dst:
                self._move(src, dst)
        return ended


class _CacheRows:
    """The first ``n`` rows of a KVCache, as the model sees a cache (views: writes land in it)."""

    def __init__(self, cache: KVCache, n: int):
        self.k, self.v, self.length = cache.k[:, :n], cache.v[:, :n], cache.length

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]


@torch.inference_mode()
def beam_search(
    model: Transformer,
    prompt: list[int],
    cfg: SampleConfig,
    *,
    eos_id: int | None,
    decode: Callable[[list[int]], str],
    device: torch.device | str = "cpu",
) -> Output:
    """Beam search over one prompt: the sequence with the best length-normalised log-probability.

    A hypothesis ends at EOS, at a stop string, or when the context is full. Scores are
    sum(log p) / length ** length_penalty. With early_stopping, search ends once num_beams
    hypotheses have ended; otherwise once no live beam can still beat the worst ended one.
    """
    K = cfg.num_beams
    ids, truncated = fit_prompt(prompt or [eos_id if eos_id is not None else 0], model.cfg.context)

    t0 = time.perf_counter()
    batch = DecodeState(model, K, device, len(ids) + cfg.max_new_tokens)
    logits = batch.prefill([ids] * K)  # (K, V)
    scores = torch.full((K,), -math.inf, device=device)
    scores[0] = 0.0  # all beams start identical: expand only one of them at first
    seqs: list[list[int]] = [[] for _ in range(K)]
    ended: list[tuple[float, list[int], str]] = []

    def norm(score: float, length: int) -> float:
        return score / max(length, 1) ** cfg.length_penalty

    def hits_stop(seq: list[int]) -> bool:
        text = decode(seq)
        return any(stop in text for stop in cfg.stop)

    for step in range(cfg.max_new_tokens):
        counts = None
        if cfg.uses_history:
            hist = torch.tensor([ids + s for s in seqs], device=device)
            counts = token_counts(hist, None, model.cfg.vocab_size)
        banned = None
        if cfg.no_repeat_ngram:  # beams reorder every step: rebuild (beam search is not the fast path)
            banned = [NGramIndex(cfg.no_repeat_ngram, ids + s).banned() for s in seqs]
        processed = process_logits(logits, cfg, counts=counts, banned=banned)
        logp = torch.log_softmax(processed, dim=-1)  # (K, V)
        cand = (scores[:, None] + logp).flatten()  # (K * V,)
        top_scores, top_idx = cand.topk(2 * K)
        V = logp.size(-1)
        new_beams: list[tuple[int, int, float]] = []
        for sc, ix in zip(top_scores.tolist(), top_idx.tolist()):
            if not math.isfinite(sc):
                break
            beam, tok = divmod(ix, V)
            if eos_id is not None and tok == eos_id:
                ended.append((norm(sc, len(seqs[beam]) + 1), seqs[beam], "eos"))
                continue
            if cfg.stop and hits_stop(seqs[beam] + [tok]):
                ended.append((norm(sc, len(seqs[beam]) + 1), seqs[beam] + [tok], "stop"))
                continue
            new_beams.append((beam, tok, sc))
            if len(new_beams) == K:
                break
        if not new_beams:
            break
        if cfg.early_stopping and len(ended) >= K:
            break
        if not cfg.early_stopping and len(ended) >= K:
            worst = sorted(e[0] for e in ended)[-K]
            if norm(new_beams[0][2], len(seqs[new_beams[0][0]]) + 1) <= worst:
                break
        while len(new_beams) < K:  # keep the batch shape: pad with dead copies
            new_beams.append((new_beams[0][0], new_beams[0][1], -math.inf))
        order = torch.tensor([b for b, _, _ in new_beams], device=device)
        batch.cache.reorder(order)
        seqs = [seqs[b] + [t] for b, t, _ in new_beams]
        scores = torch.tensor([s for _, _, s in new_beams], device=device)
        if batch.full or step == cfg.max_new_tokens - 1:
            break
        logits = batch.step(torch.tensor([t for _, t, _ in new_beams], device=device))
    for i, seq in enumerate(seqs):
        if math.isfinite(float(scores[i])):
            ended.append((norm(float(scores[i]), len(seq)), seq, "length"))
    best_score, best_seq, reason = max(ended, key=lambda e: e[0])
    stream = TextStream(decode, cfg.stop)
    for t in best_seq:
        stream.push(t)
    out = Output(
        prompt_ids=list(ids),
        ids=list(best_seq),
        text=stream.text,
        finish_reason=reason,
        truncated_prompt=truncated,
        seconds=time.perf_counter() - t0,
        score=best_score,
    )
    return out
