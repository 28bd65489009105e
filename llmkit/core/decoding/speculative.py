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
from collections.abc import Callable
from typing import Protocol

import torch

from llmkit.core.config import SampleConfig
from llmkit.core.decoding.steps import DecodeState, Output, Rows, fit_prompt
from llmkit.core.model.transformer import Transformer


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
                if history[start : start + n] == tail:
                    period = len(history) - n - start  # the match's distance back
                    follow = history[start + n :]  # (period,) tokens, then the same again
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
    fastest pass seen (a shared machine only ever slows a pass down). After ``RETRY`` plain passes
    in a row the guesses are tried again (the text may have started to repeat itself), and after
    each retry that does not pay, twice as many."""

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
            expected = n + sum(sum(a**j for j in range(1, min(c, w - 1) + 1)) for c, a in zip(caps, rates))
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
def speculative_batch(
    model: Transformer,
    prompts: list[list[int]],
    cfg: SampleConfig,
    proposers: list[Proposer],
    *,
    eos_id: int | None,
    decode: Callable[[list[int]], str],
    device,
    draft_tokens: int = 4,
    on_text: Callable[[int, str], None] | None = None,
    paced: bool = True,
) -> list[Output]:
    """Greedy decoding of several prompts together, with guesses from each row's proposer (see
    the module docstring); ``on_text(row, text)`` streams; ``paced=False`` guesses at every pass.
    Every row's tokens are its plain greedy output: each stops at EOS, a stop string or
    ``max_new_tokens``; a full context slides as in ``decode_batch`` decoding that prompt alone.
    """
    run = _Speculation(
        model,
        prompts,
        cfg,
        proposers,
        eos_id=eos_id,
        decode=decode,
        device=device,
        draft_tokens=draft_tokens,
        on_text=on_text,
    )
    t0 = time.perf_counter()
    run.start(set(), first=True)
    while any(run.alive):
        run.drop_ended()
        slide = {b for b in run.rows if len(run.views[b]) >= run.context}
        clock = time.perf_counter()  # a pass's cost: its guessing, where guesses cost, and its check
        guesses = run.guesses(paced)
        T = 1 + max(map(len, guesses))
        if slide or run.state.slot + T > run.state.length:
            run.start(slide)
            run.guessed = False  # sliding rows' drafts start again from their new text
            continue
        fed = [[run.pending[b], *g] + [0] * (T - 1 - len(g)) for b, g in zip(run.rows, guesses)]  # fillers after
        s = run.state.slot
        choices = run.state.feed(torch.tensor(fed, device=device)).argmax(-1).tolist()  # (b, T) greedy after each
        # A draft's first guesses after plain passes (or the prompt) also feed it every token it
        # missed: that pass's time is not what guessing costs, so it is not timed.
        if run.free or T == 1 or run.guessed:
            run.pacer.time(len(run.rows), T, time.perf_counter() - clock)
        run.guessed = T > 1
        run.state.keep(s, run.accept(guesses, choices))
    run.texts.finish(time.perf_counter() - t0, on_text)
    return run.outs


class _Speculation:
    """The rows of one speculative batch: what each has decoded (``views``: the tokens whose keys
    are in its cache, in order; ``pending``: its newest chosen token, emitted, not yet cached), its
    proposer, and how often its guesses were kept."""

    def __init__(
        self,
        model: Transformer,
        prompts: list[list[int]],
        cfg: SampleConfig,
        proposers: list[Proposer],
        *,
        eos_id: int | None,
        decode: Callable[[list[int]], str],
        device,
        draft_tokens: int,
        on_text: Callable[[int, str], None] | None,
    ):
        self.cfg, self.proposers, self.eos_id, self.on_text = cfg, proposers, eos_id, on_text
        self.context = model.cfg.context
        self.window = max(self.context // 2, 1)
        self.k = k = max(draft_tokens, 0)
        self.outs, self.views = [], []
        for p in prompts:
            ids, truncated = fit_prompt(p or [eos_id if eos_id is not None else 0], self.context)
            self.outs.append(Output(prompt_ids=list(ids), truncated_prompt=truncated))
            self.views.append(list(ids))
        B = len(self.views)
        self.texts = Rows(self.views, self.outs, cfg, model.cfg.vocab_size, decode, [0] * B, device)
        # Room for every row's text without holes, and for one pass's guesses past it; holes beyond
        # that rebuild the cache (``start``), at most every ``extra / k`` rejected passes.
        need = max(map(len, self.views)) + cfg.max_new_tokens
        self.state = DecodeState(model, B, device, need, extra=max(k + 1, min(cfg.max_new_tokens * k, self.context)))
        self.spans = [min(self.context, len(v) + cfg.max_new_tokens + k + 1) for v in self.views]  # proposers' room
        self.pending = [0] * B
        self.alive = [True] * B
        self.rows = list(range(B))  # the output row held by each row of the cache, in order
        self.pacer = _Pacer()
        self.guessed = False  # whether the last pass carried guesses (a draft then has nothing to catch up on)
        # Each row's recent guesses, kept and failed: a pass keeps n guesses and fails once (unless it
        # kept them all), so kept / (kept + failed) estimates the chance of keeping the next guess
        # after a kept one. Decayed, since the loops of small models come and go.
        self.kept_n, self.failed_n = [0.0] * B, [0.0] * B
        self.free = all(p.free for p in proposers)  # copied guesses: made first, trimmed by the pacer

    def guess(self, b: int, n: int) -> list[int]:
        return self.proposers[b].propose(self.views[b] + [self.pending[b]], n) if n > 0 else []

    def emit(self, b: int, token: int) -> bool:
        """Append a chosen token to row b's output; False when the row has ended."""
        return (
            self.texts.push(b, token, self.eos_id, None, self.on_text)
            and len(self.outs[b].ids) < self.cfg.max_new_tokens
        )

    def start(self, slide: set[int], first: bool = False) -> None:
        """(Re)build the cache from every row's tokens. Rows in ``slide`` slide exactly as the plain
        path does (the most recent half-context, pending included, becomes the new cache); they
        (every row, the ``first`` time) choose their next token from it, the others keep theirs."""
        for b in slide:
            self.views[b] = (self.views[b] + [self.pending[b]])[-self.window :]
        choices = self.state.prefill([self.views[b] for b in self.rows]).argmax(-1).tolist()  # greedy after each
        for i, b in enumerate(self.rows):
            if first or b in slide:
                self.proposers[b].start(self.views[b], self.spans[b])
                self.pending[b] = choices[i]
                self.alive[b] = self.emit(b, self.pending[b])

    def drop_ended(self) -> None:
        """Rows that have ended leave the batch."""
        if not all(self.alive[b] for b in self.rows):
            self.state.select([i for i, b in enumerate(self.rows) if self.alive[b]])
            self.rows = [b for b in self.rows if self.alive[b]]

    def guesses(self, paced: bool) -> list[list[int]]:
        """Each row's guesses for the next pass, as many as the pacer finds worth checking."""
        cfg, rows = self.cfg, self.rows
        rooms = [
            min(self.k, cfg.max_new_tokens - len(self.outs[b].ids), self.context - len(self.views[b]) - 1) for b in rows
        ]
        guesses = [self.guess(b, room) for b, room in zip(rows, rooms)] if self.free else None
        width = 1 + max(max(rooms), 0)
        if paced:
            rates = [(self.kept_n[b] + 1) / (self.kept_n[b] + self.failed_n[b] + 2) for b in rows]
            width = self.pacer.width(list(map(len, guesses)) if self.free else rooms, rates)
        if self.free:
            return [g[: width - 1] for g in guesses]
        return [self.guess(b, min(room, width - 1)) for b, room in zip(rows, rooms)]  # a draft: what the pass carries

    def accept(self, guesses: list[list[int]], choices: list[list[int]]) -> list[int]:
        """Keep each row's guesses up to the first the model disagrees with, then its own choice;
        the number of slots each row keeps (the pending token and the agreed guesses)."""
        kept = []
        for b, g, chosen in zip(self.rows, guesses, choices):
            n = 0
            while n < len(g) and g[n] == chosen[n]:
                n += 1
            self.outs[b].drafted += len(g)
            self.outs[b].accepted += n
            if g:
                self.kept_n[b] = 0.8 * self.kept_n[b] + n
                self.failed_n[b] = 0.8 * self.failed_n[b] + (n < len(g))
            kept.append(1 + n)
            self.views[b] += [self.pending[b], *g[:n]]
            for token in g[:n]:
                self.alive[b] = self.emit(b, token)
                if not self.alive[b]:
                    break
            if self.alive[b]:
                self.pending[b] = chosen[n]
                self.alive[b] = self.emit(b, self.pending[b])
        return kept
