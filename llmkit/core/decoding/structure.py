"""Structured outputs: the shape an answer must have, and the matchers that keep decoding inside it.

A :class:`Structure` says what a valid answer is: one of a list of choices, a match of a regular
expression, a JSON value that fits a JSON schema, any JSON object, or a Lark grammar (tool calls are
built from those). :class:`Grammars` compiles it for one tokenizer and hands out one
:class:`Matcher` per output row; at each step the matcher says which tokens keep the text valid
(``constrain`` masks the others to -inf before penalties and filters), then follows the token chosen.

The engine is llguidance (Microsoft; Earley parsing over a token trie, in Rust). It was measured
against xgrammar and outlines-core on llmkit's own tokenizers (``benchmarks/grammar_engines.py``,
docs/benchmarks.md): it compiles a schema in about a millisecond where outlines-core took seconds
on Gemma's 262,144 tokens, and its mask costs about 0.1 ms per token on a 49k vocabulary, where
xgrammar's cost grows with the vocabulary (about 1 ms at 262k) — both far under a decoding step of
a real model on a CPU. It is imported only when a structure is asked for.

JSON is written in one style, ``{"key": value, "key": value}`` (the separators of Python's
``json.dumps``, the style models see most), with no other whitespace: a grammar that allowed free
whitespace would let a small model pad forever.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.core.errors import ConfigError
from llmkit.core.files.corpus import read_text

NEG_INF = float("-inf")
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructureError(ConfigError):
    """A structure the engine cannot compile (an invalid schema, regex or grammar)."""


@dataclass(frozen=True)
class Structure:
    """What a valid answer is. ``kind``: choices | regex | json_schema | json_object | lark."""

    kind: str
    spec: Any
    source: str = ""
    """Where it came from, for messages (a flag, a file, a request field)."""

    @classmethod
    def choices(cls, options: list[str], source: str = "--choices") -> Structure:
        options = list(dict.fromkeys(options))  # duplicates would only slow the parser
        if not options or any(not o for o in options):
            raise StructureError(f"{source}: give at least one choice, and no empty one")
        return cls("choices", tuple(options), source)

    @classmethod
    def regex(cls, pattern: str, source: str = "--regex") -> Structure:
        if not pattern:
            raise StructureError(f"{source}: the regular expression is empty")
        return cls("regex", pattern, source)

    @classmethod
    def json_schema(cls, schema: Any, source: str = "--json-schema") -> Structure:
        if isinstance(schema, bool) or not isinstance(schema, dict):
            raise StructureError(f"{source}: a JSON schema is a JSON object, not {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema), source)  # the order of its properties is the answer's

    @classmethod
    def json_object(cls, source: str = "--json-object") -> Structure:
        return cls("json_object", None, source)

    @classmethod
    def lark(cls, grammar: str, source: str = "grammar") -> Structure:
        return cls("lark", grammar, source)

    def grammar(self) -> str:
        """The structure as a grammar llguidance reads."""
        LLMatcher = engine().LLMatcher
        if self.kind == "choices":
            # Lark string literals take JSON's escapes: any choice, quotes and newlines included.
            return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.spec)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind in ("json_schema", "json_object"):
            schema = self.spec if self.kind == "json_schema" else '{"type": "object"}'
            try:
                return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
            except ValueError as e:
                raise StructureError(f"{self.source}: {_one_line(e)}") from None
        return self.spec

    def describe(self) -> str:
        """The structure in a few words, for messages."""
        if self.kind == "choices":
            return f"one of {len(self.spec)} choices"
        return {
            "regex": "a match of the regular expression",
            "json_schema": "JSON that fits the schema",
            "json_object": "a JSON object",
            "lark": "the grammar",
        }[self.kind]


def engine():
    """The llguidance module, or one line saying how to install it."""
    try:
        import llguidance  # optional dependency (the structured extra): imported when a structure is asked for
    except ImportError:
        raise StructureError(
            "structured outputs need the grammar engine llguidance: pip install 'llmkit[structured]'"
        ) from None
    return llguidance


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def parse_choices(value: str, source: str = "--choices") -> Structure:
    """``A|B|C``, or ``@FILE``: one choice per non-blank line of a file (choices that contain ``|``)."""
    if value.startswith("@"):
        return Structure.choices([line for line in read_text(Path(value[1:])).splitlines() if line.strip()], source)
    return Structure.choices(value.split("|"), source)


def read_schema(text: str, source: str) -> Structure:
    """A JSON schema from its text (a file's contents): one line naming the fault if it is not JSON."""
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise StructureError(f"{source}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return Structure.json_schema(schema, source)


def from_options(
    choices: str | None = None, regex: str | None = None, json_schema: Path | None = None, json_object: bool = False
) -> Structure | None:
    """The structure the command-line flags ask for (at most one of them), or None."""
    given = [
        n
        for n, v in (
            ("--choices", choices),
            ("--regex", regex),
            ("--json-schema", json_schema),
            ("--json-object", json_object or None),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise StructureError(f"give one of {', '.join(given)}, not several: an answer has one shape")
    if choices is not None:
        return parse_choices(choices)
    if regex is not None:
        return Structure.regex(regex)
    if json_schema is not None:
        return read_schema(read_text(Path(json_schema)), str(json_schema))
    return Structure.json_object() if json_object else None


class Compiled:
    """A structure compiled for one tokenizer: checked once, a fresh :class:`Matcher` per row."""

    def __init__(self, structure: Structure, tokenizer, grammar: str):
        self.structure, self.tokenizer, self.grammar = structure, tokenizer, grammar

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One row's place in its structure: which tokens may come next, and the tokens taken so far."""

    def __init__(self, compiled: Compiled):
        self.compiled = compiled
        self.m = engine().LLMatcher(compiled.tokenizer, compiled.grammar, log_level=0)
        self.words = (compiled.tokenizer.vocab_size + 31) // 32

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed tokens into ``row`` (words,) int32: bit t of word t // 32 set when
        token t keeps the text valid."""
        self.m.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)

    def accept(self, token: int) -> bool:
        return self.m.consume_token(token)

    @property
    def stopped(self) -> bool:
        """Nothing can follow but the end: the structure is complete and allows no more text."""
        return self.m.is_stopped()

    @property
    def complete(self) -> bool:
        """The text so far is a whole valid answer (more may still be allowed, e.g. digits)."""
        return self.m.is_accepting()

    @property
    def error(self) -> str:
        return self.m.get_error() if self.m.is_error() else ""


def constrain(logits: torch.Tensor, matchers: list[Matcher | None]) -> torch.Tensor:
    """logits (B, V) -> the same with every token that would break row b's structure at -inf
    (rows whose matcher is None are left as they are)."""
    if not any(m is not None for m in matchers):
        return logits
    B, V = logits.shape
    words = next(m for m in matchers if m is not None).words
    masks = np.full((B, max(words, (V + 31) // 32)), -1, dtype=np.int32)  # (B, W) all allowed
    for b, m in enumerate(matchers):
        if m is not None:
            masks[b] = 0  # ids past the tokenizer's vocabulary (a padded head) are no tokens
            m.fill(torch.from_numpy(masks[b, :words]))
    # Bit i of word w is token 32w + i: the words' little-endian bytes, each unpacked low bit first.
    # (numpy's unpackbits is one pass in C; the same with torch shifts cost ~1 ms a row at 49k tokens.)
    allowed = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :V].view(bool)  # (B, W * 32) -> (B, V)
    if logits.device.type == "cpu":
        # In numpy, on one thread: torch spreads a 49k-element op over every core, and on a busy
        # machine each token then waits for a core that is not free (17 ms a token, measured).
        return torch.from_numpy(np.where(allowed, logits.float().numpy(), np.float32(NEG_INF)))
    return torch.where(torch.from_numpy(allowed).to(logits.device), logits, NEG_INF)


class Grammars:
    """llguidance's view of one tokenizer (built once: about a second for a 262,144-token vocabulary)
    and the structures compiled for it. ``for_tokenizer`` keeps one per tokenizer and end tokens."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer, eos_ids: tuple[int, ...]):
        llguidance = engine()
        table = tokenizer.token_bytes()

        class View:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id = eos_ids[0], tokenizer.bos_id
            # A special token spells no text: llguidance knows it by its id, and never lets the
            # text of its name (``<start_of_turn>``) stand for it.
            tokens = [b if b is not None else tokenizer.id_to_piece(i).encode() for i, b in enumerate(table)]
            special_token_ids = [i for i, b in enumerate(table) if b is None]

            def __call__(self, text: bytes) -> list[int]:
                return tokenizer.encode(text.decode("utf-8", errors="replace"))

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(View()), eos_token=list(eos_ids))
        self._compiled: dict[Structure, Compiled] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer, eos_ids: tuple[int, ...]) -> Grammars:
        per_tokenizer = cls._cache.setdefault(tokenizer, {})
        if eos_ids not in per_tokenizer:
            per_tokenizer[eos_ids] = cls(tokenizer, eos_ids)
        return per_tokenizer[eos_ids]

    def compile(self, structure: Structure) -> Compiled:
        """The structure checked and ready; a :class:`StructureError` naming the fault if the engine
        cannot compile it."""
        if structure not in self._compiled:
            grammar = structure.grammar()
            probe = engine().LLMatcher(self.tokenizer, grammar, log_level=0)
            if probe.is_error():
                raise StructureError(f"{structure.source}: {_engine_message(probe.get_error())}")
            if len(self._compiled) >= 64:  # a server sees many schemas: keep the recent ones only
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[structure] = Compiled(structure, self.tokenizer, grammar)
        return self._compiled[structure]


def _engine_message(message: str) -> str:
    """llguidance's error in one line, without its parser's context (for a regular expression:
    the fault alone, ``unclosed group``, not the grammar it was wrapped in)."""
    flat = " ".join(message.split())
    if "regex parse error" in flat:
        fault = flat.split("error:")[-1].split("|")[0]
        return "not a valid regular expression: " + re.sub(r"\s+\d+\s*$", "", fault).strip()
    return _one_line(flat)


def compile_structure(structure: Structure, tokenizer, eos_id: int | None) -> Compiled:
    """``structure`` compiled for ``tokenizer``, with ``eos_id`` as the token that ends an answer."""
    eos = (eos_id if eos_id is not None else tokenizer.eos_id,)
    return Grammars.for_tokenizer(tokenizer, eos).compile(structure)
