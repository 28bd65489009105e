"""Speculative greedy decoding: cheap guesses, checked by the model in one pass.

A *proposer* guesses the next few tokens; the model scores the last accepted token and all the
guesses in one forward pass of k + 1 positions (through its position-indexed KV cache), keeps the
longest run of guesses that equal its own greedy choices, and adds its own next token after them.
Every emitted token is the model's greedy choice, so the output is the plain greedy output; what
changes is how many tokens one pass of the model yields (``accepted / drafted`` is reported).

Proposers:
- ``DraftModel``: a smaller llmkit model sharing the tokenizer decodes greedily k tokens ahead
  (Leviathan et al. 2023; Chen et al. 2023), with its own KV cache, rolled back with the model's.
- ``PromptLookup``: copies the tokens that followed the most recent earlier occurrence of the last
  n-gram of the text (prompt lookup decoding, Saxena 2023): free, and strong on inputs that repeat
  themselves (summaries, edits, code, extraction).

Rows decode together: one pass checks every row's guesses (rows with fewer are filled with
throwaway tokens), so a batch of 8 costs about one pass per accepted run, as at batch 1. Rows keep
different numbers of tokens from a pass; the rejected slots of each row are masked out
(``DecodeState.keep``) and the next pass starts after the longest, so the cache carries a few
holes; when it is full, or a row's text reaches the context (which slides, as on the plain path),
the cache is rebuilt from every row's tokens. Rows that have ended leave the batch. With one row,
or when every row keeps as many tokens, rolling back is free instead: slots past the accepted
tokens hold stale keys, the causal mask hides every slot after a query's own, and the next pass
overwrites them.

Guessing is not free: a pass of 1 + k positions per row costs more than one of 1, little when
decoding is bound by reading the weights (batch 1), up to k + 1 times when it is bound by
arithmetic (a batch of a larger model). ``_Pacer`` times the passes and guesses only when the
tokens a pass is expected to yield, at each row's recent acceptance rate, pay for its cost. Free
guesses (copied ones) are made first and trimmed; a costly proposer (a draft model) is asked
after the pacer decides, for no more than the pass carries, and its time is part of the cost.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Protocol

import torch

from llmkit.core.config import SampleConfig
from llmkit.core.generate import DecodeState, Output, Rows, fit_prompt
from llmkit.core.model import Transformer


class Proposer(Protocol):
    free: bool
    """Whether guessing costs nothing worth timing (copied guesses): then the guesses are made
    first and the pacer trims them; a costly proposer (a draft model) is asked for only as many
    as the pacer decides a pass carries, and its time counts in the pass's cost."""

    def start(self, prompt: list[int], length: int) -> None:
        """A new text: ``prompt`` is already accepted; at most ``length`` slots in all."""

    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to k guessed tokens to follow ``history`` (every accepted token so far)."""


class DraftModel:
    """A smaller model's greedy guesses (it must share the target's tokenizer)."""

    free = False

    def __init__(self, model: Transformer, device):
        self.model, self.device = model, device

    def start(self, prompt: list[int], length: int) -> None:
        self.state = DecodeState(self.model, 1, self.device, min(length, self.model.cfg.context))
        self.fed: list[int] = []  # the tokens in the draft's cache, slot by slot
        self.known = 0  # how many of them are certainly the history's (the previous call's history)

    def propose(self, history: list[int], k: int) -> list[int]:
        # Only the tokens after the previous call's history can differ from what was fed (the
        # model kept some guesses, then chose its own): roll back to the first difference.
        common = self.known
        while common < min(len(self.fed), len(history)) and self.fed[common] == history[common]:
            common += 1
        common = min(common, len(history) - 1)  # feed at least the newest token
        k = min(k, self.state.length - len(history))
        if k <= 0:
            return []
        self.state.rewind(common)
        logits = self.state.feed(torch.tensor([history[common:]], device=self.device), last_only=True)[0]
        self.fed, self.known = list(history), len(history)
        out: list[int] = []
        for _ in range(k):
            token = int(logits[-1].argmax())
            out.append(token)
            if len(out) == k:
                break
            logits = self.state.step(torch.tensor([token], device=self.device))
            self.fed.append(token)
        return out


class PromptLookup:
    """Guesses copied from earlier in the text: after the latest earlier match of the last n
    tokens (n from ``max_ngram`` down to 1), the tokens that followed it. A match close to the
    end has fewer than k tokens after it: the text is then repeating itself with that period,
    and the guesses go on repeating it (a loop of two tokens yields k guesses, not one)."""

    free = True

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def start(self, prompt: list[int], length: int) -> None:
        pass

    def propose(self, history: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            tail = history[-n:]
            for start in range(len(history) - n - 1, -1, -1):  # the most recent match first
                if history[start: start + n] == tail:
                    period = len(history) - n - start  # the match's distance back
                    follow = history[start + n:]  # (period,) tokens, then the same again
                    return [follow[j % period] for j in range(k)]
        return []


def guesses_per_pass(proposer: Proposer) -> int:
    """The default guesses per pass: 4 for a draft model (each guess costs one of its passes), 8
    for prompt lookup (copied guesses are free, and the pacer trims the ones that do not pay)."""
    return 4 if isinstance(proposer, DraftModel) else 8


class _Pacer:
    """How many positions each row of a pass feeds: 1 (no guesses) up to 1 + the most guesses,
    whichever promises the most tokens per second — the tokens expected at each row's recent
    acceptance rate, over the pass's cost timed so far (per batch size and width).

    A first pass with all the guesses and a first plain pass are timed before anything is
    compared; a width not yet timed is then costed on the straight line between the timed widths
    around it. Where the true cost rises faster at first (batch 1: the first extra position turns
    matrix-vector products into matrix products) the line is too low, so that width gets tried,
    and timed; where it is straight (arithmetic-bound batches) the line is right. Each cost is the
    fastest pass seen (a shared machine only ever slows a pass down). After ``RETRY`` plain passes in a row the guesses are tried again (the text may have
    started to repeat itself), and after each retry that does not pay, twice as many."""

    RETRY = 8

    def __init__(self):
        self.cost: dict[tuple[int, int], float] = {}  # (rows, positions per row) -> seconds
        self.refused, self.retry = 0, self.RETRY

    def time(self, rows: int, width: int, seconds: float) -> None:
        self.cost[(rows, width)] = min(seconds, self.cost.get((rows, width), math.inf))

    def _cost(self, rows: int, width: int) -> float | None:
        """The timed cost of a width, or the line between the timed widths around it; None past
        the widest timed."""
        timed = sorted((w, c) for (r, w), c in self.cost.items() if r == rows)  # the plain pass first
        below = [(w, c) for w, c in timed if w <= width]
        above = [(w, c) for w, c in timed if w >= width]
        if not above:
            return None
        (w0, c0), (w1, c1) = below[-1], above[0]
        return c0 if w1 == w0 else c0 + (c1 - c0) * (width - w0) / (w1 - w0)

    def width(self, caps: list[int], rates: list[float]) -> int:
        """The positions per row of the next pass, given each row's most guesses (``caps``: those
        made already, or the room for them) and recent acceptance rate."""
        n, top = len(caps), 1 + max(max(caps), 0)
        if top == 1:
            return 1
        if not any(r == n and w > 1 for r, w in self.cost):
            return top  # no pass with guesses timed yet
        if (n, 1) not in self.cost:
            return 1  # nor a plain one
        best, best_rate = 1, n / self.cost[(n, 1)]
        for w in range(2, top + 1):
            cost = self._cost(n, w)
            if cost is None:  # wider than any timed: tried when a retry comes
                break
            # A row keeps its j-th guess if it kept the j - 1 before: rate ** j of them on average.
            expected = n + sum(sum(a ** j for j in range(1, min(c, w - 1) + 1)) for c, a in zip(caps, rates))
            if expected / cost > best_rate:
                best, best_rate = w, expected / cost
        if best > 1:
            self.refused, self.retry = 0, self.RETRY
            return best
        if self.refused < self.retry:
            self.refused += 1
            return 1
        self.refused, self.retry = 0, 2 * self.retry
        return top


@torch.inference_mode()
def speculative_batch(model: Transformer, prompts: list[list[int]], cfg: SampleConfig,
                      proposers: list[Proposer], *, eos_id: int | None, decode: Callable[[list[int]], str],
                      device, draft_tokens: int = 4, on_text: Callable[[int, str], None] | None = None,
                      paced: bool = True) -> list[Output]:
    """Greedy decoding of several prompts together, with guesses from each row's proposer (see
    the module docstring); ``on_text(row, text)`` streams; ``paced=False`` guesses at every pass.
    Every row's tokens are its plain greedy output: each stops at EOS, a stop string or
    ``max_new_tokens``; a full context slides as in ``decode_batch`` decoding that prompt alone.
    """
    context = model.cfg.context
    window = max(context // 2, 1)
    k = max(draft_tokens, 0)
    outs, views = [], []  # views[b]: the tokens whose keys are in row b's cache, in order
    for p in prompts:
        ids, truncated = fit_prompt(p or [eos_id if eos_id is not None else 0], context)
        outs.append(Output(prompt_ids=list(ids), truncated_prompt=truncated))
        views.append(list(ids))
    B = len(views)
    texts = Rows(views, outs, cfg, model.cfg.vocab_size, decode, [0] * B, device)  # outputs and text streams
    t0 = time.perf_counter()
    # Room for every row's text without holes, and for one pass's guesses past it; holes beyond
    # that rebuild the cache (``start``), at most every ``extra / k`` rejected passes.
    need = max(map(len, views)) + cfg.max_new_tokens
    state = DecodeState(model, B, device, need, extra=max(k + 1, min(cfg.max_new_tokens * k, context)))
    spans = [min(context, len(v) + cfg.max_new_tokens + k + 1) for v in views]  # each proposer's room
    pending = [0] * B  # each row's newest chosen token: emitted, not yet in the cache
    alive = [True] * B
    rows = list(range(B))  # the output row held by each row of the cache, in order
    pacer = _Pacer()
    guessed = False  # whether the last pass carried guesses (a draft then has nothing to catch up on)
    # Each row's recent guesses, kept and failed: a pass keeps n guesses and fails once (unless it
    # kept them all), so kept / (kept + failed) estimates the chance of keeping the next guess
    # after a kept one. Decayed, since the loops of small models come and go.
    kept_n, failed_n = [0.0] * B, [0.0] * B
    free = all(p.free for p in proposers)  # copied guesses: made first, trimmed by the pacer

    def guess(b: int, n: int) -> list[int]:
        return proposers[b].propose(views[b] + [pending[b]], n) if n > 0 else []

    def emit(b: int, token: int) -> bool:
        """Append a chosen token to row b's output; False when the row has ended."""
        return texts.push(b, token, eos_id, None, on_text) and len(outs[b].ids) < cfg.max_new_tokens

    def start(slide: set[int], first: bool = False) -> None:
        """(Re)build the cache from every row's tokens. Rows in ``slide`` slide exactly as the plain
        path does (the most recent half-context, pending included, becomes the new cache); they
        (every row, the ``first`` time) choose their next token from it, the others keep theirs."""
        for b in slide:
            views[b] = (views[b] + [pending[b]])[-window:]
        choices = state.prefill([views[b] for b in rows]).argmax(-1).tolist()  # the greedy token after each
        for i, b in enumerate(rows):
            if first or b in slide:
                proposers[b].start(views[b], spans[b])
                pending[b] = choices[i]
                alive[b] = emit(b, pending[b])

    start(set(), first=True)
    while any(alive):
        if not all(alive[b] for b in rows):  # rows that have ended leave the batch
            state.select([i for i, b in enumerate(rows) if alive[b]])
            rows = [b for b in rows if alive[b]]
        slide = {b for b in rows if len(views[b]) >= context}
        clock = time.perf_counter()  # a pass's cost: its guessing, where guesses cost, and its check
        rooms = [min(k, cfg.max_new_tokens - len(outs[b].ids), context - len(views[b]) - 1) for b in rows]
        guesses = [guess(b, room) for b, room in zip(rows, rooms)] if free else None
        width = 1 + max(max(rooms), 0)
        if paced:
            rates = [(kept_n[b] + 1) / (kept_n[b] + failed_n[b] + 2) for b in rows]
            width = pacer.width(list(map(len, guesses)) if free else rooms, rates)
        if free:
            guesses = [g[: width - 1] for g in guesses]
        else:  # a draft is asked for what the pass will carry, no more
            guesses = [guess(b, min(room, width - 1)) for b, room in zip(rows, rooms)]
        T = 1 + max(map(len, guesses))
        if slide or state.slot + T > state.length:
            start(slide)
            guessed = False  # sliding rows' drafts start again from their new text
            continue
        fed = [[pending[b], *g] + [0] * (T - 1 - len(g)) for b, g in zip(rows, guesses)]  # fillers after
        s = state.slot
        choices = state.feed(torch.tensor(fed, device=device)).argmax(-1).tolist()  # (b, T) greedy after each
        # A draft's first guesses after plain passes (or the prompt) also feed it every token it
        # missed: that pass's time is not what guessing costs, so it is not timed.
        if free or T == 1 or guessed:
            pacer.time(len(rows), T, time.perf_counter() - clock)
        guessed = T > 1
        kept = []
        for b, g, chosen in zip(rows, guesses, choices):
            n = 0
            while n < len(g) and g[n] == chosen[n]:
                n += 1
            outs[b].drafted += len(g)
            outs[b].accepted += n
            if g:
                kept_n[b], failed_n[b] = 0.8 * kept_n[b] + n, 0.8 * failed_n[b] + (n < len(g))
            kept.append(1 + n)  # the pending token and the guesses the model agrees with
            views[b] += [pending[b], *g[:n]]
            for token in g[:n]:
                alive[b] = emit(b, token)
                if not alive[b]:
                    break
            if alive[b]:
                pending[b] = chosen[n]
                alive[b] = emit(b, pending[b])
        state.keep(s, kept)
    texts.finish(time.perf_counter() - t0, on_text)
    return outs
