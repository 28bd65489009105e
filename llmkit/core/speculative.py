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

Rolling back a cache is free: slots past the accepted tokens hold stale keys, but the causal mask
hides every slot after a query's own, and the next pass overwrites them.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import torch

from llmkit.core.config import SampleConfig
from llmkit.core.generate import DecodeState, Output, TextStream, fit_prompt
from llmkit.core.model import Transformer


class Proposer(Protocol):
    def start(self, prompt: list[int], length: int) -> None:
        """A new text: ``prompt`` is already accepted; at most ``length`` slots in all."""

    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to k guessed tokens to follow ``history`` (every accepted token so far)."""


class DraftModel:
    """A smaller model's greedy guesses (it must share the target's tokenizer)."""

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
    tokens (n from ``max_ngram`` down to 1), the tokens that followed it."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def start(self, prompt: list[int], length: int) -> None:
        pass

    def propose(self, history: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            tail = history[-n:]
            for start in range(len(history) - n - 1, -1, -1):  # the most recent match first
                if history[start: start + n] == tail:
                    return history[start + n: start + n + k]
        return []


@torch.inference_mode()
def speculative_decode(model: Transformer, prompt: list[int], cfg: SampleConfig, proposer: Proposer, *,
                       eos_id: int | None, decode: Callable[[list[int]], str], device,
                       draft_tokens: int = 4, on_text: Callable[[str], None] | None = None) -> Output:
    """Greedy decoding of one prompt with guesses from ``proposer`` (see the module docstring).

    Stops at EOS, a stop string or ``max_new_tokens``; a full context slides as in ``decode_batch``.
    """
    context = model.cfg.context
    window = max(context // 2, 1)
    ids, truncated = fit_prompt(prompt or [eos_id if eos_id is not None else 0], context)
    out = Output(prompt_ids=list(ids), truncated_prompt=truncated)
    stream = TextStream(decode, cfg.stop)
    t0 = time.perf_counter()
    length = min(context, len(ids) + cfg.max_new_tokens + draft_tokens + 1)
    target = DecodeState(model, 1, device, length)
    view = list(ids)  # the tokens whose keys are in the model's cache, in slot order

    def feed(tokens: list[int]) -> torch.Tensor:
        return target.feed(torch.tensor([tokens], device=device))[0]  # (len(tokens), V)

    proposer.start(view, length)
    # ``pending`` is the newest chosen token: emitted, not yet in the model's cache.
    pending = int(feed(view)[-1].argmax())

    def emit(token: int) -> bool:
        """Append a chosen token to the output; False when the output has ended."""
        if eos_id is not None and token == eos_id:
            out.finish_reason = "eos"
            return False
        out.ids.append(token)
        shown = stream.push(token)
        if on_text and shown:
            on_text(shown)
        if stream.stopped:
            out.finish_reason = "stop"
            return False
        return len(out.ids) < cfg.max_new_tokens

    going = emit(pending)
    while going:
        if target.full:
            # The context is full: slide exactly as the plain path does (the most recent
            # half-context, pending included, becomes the new cache), so the output stays its own.
            view = (view + [pending])[-window:]
            target.rewind(0)
            proposer.start(view, length)
            pending = int(feed(view)[-1].argmax())
            going = emit(pending)
            continue
        view.append(pending)
        room = min(draft_tokens, cfg.max_new_tokens - len(out.ids), length - target.slot - 1)
        guesses = proposer.propose(view, room) if room > 0 else []
        logits = feed([pending, *guesses])  # (1 + g, V)
        choices = logits.argmax(-1).tolist()  # the model's greedy token after each position
        n = 0
        while n < len(guesses) and guesses[n] == choices[n]:
            n += 1
        out.drafted += len(guesses)
        out.accepted += n
        target.rewind(target.slot - (len(guesses) - n))  # roll back past the first wrong guess
        for token in guesses[:n]:
            going = emit(token)
            if not going:
                break
            view.append(token)
        if going:
            pending = choices[n]
            going = emit(pending)
    rest = stream.flush()
    if on_text and rest:
        on_text(rest)
    out.text = stream.text
    out.seconds = time.perf_counter() - t0
    return out
