"""Which grammar engine constrains llmkit's decoding: llguidance, xgrammar and outlines-core measured
on llmkit's own tokenizers (the choice behind ``llmkit generate --json-schema``; docs/benchmarks.md).

For each tokenizer (a checkpoint or tokenizer directory) and each engine: the time to build the
engine's view of the vocabulary, the time to compile each grammar, and the cost per token of the
constraint while walking a valid answer token by token (the mask computed, the token accepted, the
mask applied to a logits row), median and p99 over the walk. Every engine sees the same token bytes
(``Tokenizer.token_bytes``) and the same answers; an engine that cannot compile a grammar says so.

    cd benchmarks && ../.venv/bin/python grammar_engines.py CKPT [CKPT ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmkit.core.text.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "nom": {"type": "string", "maxLength": 40},
        "ville": {"type": "string", "enum": ["Paris", "Lyon", "Marseille", "Lille"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "langues": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "adresse": {
            "type": "object",
            "properties": {"rue": {"type": "string"}, "code": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["rue", "code"],
            "additionalProperties": False,
        },
    },
    "required": ["nom", "ville", "age"],
    "additionalProperties": False,
}
ANSWER_JSON = json.dumps(
    {
        "nom": "Élodie Martin",
        "ville": "Lyon",
        "age": 34,
        "langues": ["français", "anglais"],
        "adresse": {"rue": "12 rue de la République", "code": "69002"},
    },
    ensure_ascii=False,
    separators=(",", ":"),
)
REGEX = r"[0-9]{2}/[0-9]{2}/[0-9]{4}"
ANSWER_REGEX = "14/07/1789"
GRAMMARS = {"json-schema": (SCHEMA, ANSWER_JSON), "regex": (REGEX, ANSWER_REGEX)}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tk: Tokenizer):
        import llguidance

        from llmkit.core.decoding.structure import Grammars

        self.ll = llguidance
        self.tokenizer = Grammars(tk, (tk.eos_id,)).tokenizer  # llmkit's own view of the vocabulary
        self.V = tk.vocab_size

    def compile(self, kind, spec):
        M = self.ll.LLMatcher
        grammar = M.grammar_from_json_schema(json.dumps(spec)) if kind == "json-schema" else M.grammar_from_regex(spec)
        m = M(self.tokenizer, grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return grammar

    def walk(self, grammar, ids, logits):
        from llguidance.torch import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

        m = self.ll.LLMatcher(self.tokenizer, grammar)
        mask = allocate_token_bitmask(1, self.V)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            fill_next_token_bitmask(m, mask, 0)
            row = logits.clone()
            apply_token_bitmask_inplace(row, mask)
            ok = m.consume_token(t)
            times.append(time.perf_counter() - t0)
            assert ok and row[0, t] != float("-inf"), m.get_error()
        return times


class XGrammar:
    name = "xgrammar"

    def __init__(self, tk: Tokenizer):
        import xgrammar

        self.xg = xgrammar
        table = [b if b is not None else b"" for b in tk.token_bytes()]
        info = xgrammar.TokenizerInfo(table, vocab_size=tk.vocab_size, stop_token_ids=[tk.eos_id])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.V = tk.vocab_size

    def compile(self, kind, spec):
        if kind == "json-schema":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(",", ":"))
        return self.compiler.compile_regex(spec)

    def walk(self, grammar, ids, logits):
        m = self.xg.GrammarMatcher(grammar)
        mask = self.xg.allocate_token_bitmask(1, self.V)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            row = logits.clone()
            self.xg.apply_token_bitmask_inplace(row, mask)
            ok = m.accept_token(t)
            times.append(time.perf_counter() - t0)
            assert ok and row[0, t] != float("-inf")
        return times


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tk: Tokenizer):
        import outlines_core

        self.oc = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(tk.token_bytes()):
            if b is not None and i != tk.eos_id:
                by_bytes.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(tk.eos_id, by_bytes)
        self.V = tk.vocab_size

    def compile(self, kind, spec):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec)) if kind == "json-schema" else spec
        return self.oc.Index(regex, self.vocab)

    def walk(self, index, ids, logits):
        guide = self.oc.Guide(index)
        mask = torch.zeros(1, (self.V + 31) // 32, dtype=torch.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            allowed = ((mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[: self.V].bool()
            row = logits.masked_fill(~allowed, float("-inf"))
            guide.advance(t)
            times.append(time.perf_counter() - t0)
            assert row[0, t] != float("-inf")
        return times


ENGINES = [LLGuidance, XGrammar, OutlinesCore]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokenizers", nargs="+", type=Path, help="checkpoint or tokenizer directories")
    ap.add_argument("--rounds", type=int, default=3, help="walks per grammar (the median of all steps is kept)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in args.tokenizers:
        tk = Tokenizer.find_in(path)
        tk.token_bytes()
        logits = torch.randn(1, tk.vocab_size)
        for Engine in ENGINES:
            row = {"tokenizer": path.name, "vocab": tk.vocab_size, "engine": Engine.name}
            t0 = time.perf_counter()
            try:
                engine = Engine(tk)
            except Exception as e:  # an engine that cannot read this vocabulary is a result too
                print(json.dumps({**row, "error": f"{type(e).__name__}: {e}"[:200]}), flush=True)
                continue
            row["vocab_s"] = round(time.perf_counter() - t0, 3)
            for kind, (spec, answer) in GRAMMARS.items():
                ids = tk.encode(answer)
                t0 = time.perf_counter()
                try:
                    grammar = engine.compile(kind, spec)
                except Exception as e:
                    print(json.dumps({**row, "grammar": kind, "error": f"{type(e).__name__}: {e}"[:200]}), flush=True)
                    continue
                compile_s = time.perf_counter() - t0
                steps = [s for _ in range(args.rounds) for s in engine.walk(grammar, ids, logits)]
                steps.sort()
                print(
                    json.dumps(
                        {
                            **row,
                            "grammar": kind,
                            "compile_s": round(compile_s, 4),
                            "tokens": len(ids),
                            "per_token_us_p50": round(statistics.median(steps) * 1e6, 1),
                            "per_token_us_p99": round(steps[min(len(steps) - 1, int(0.99 * len(steps)))] * 1e6, 1),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
