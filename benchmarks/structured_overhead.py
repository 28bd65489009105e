"""What a structure costs while decoding: tokens per second with and without a JSON schema held by
the grammar engine, at batch 1 and 8, and the time to compile schemas (docs/benchmarks.md).
Tokens per second are counted after the first token (the prefill is timed apart and taken out).

Both sides decode the same prompts greedily through ``Decoder`` (the path of ``llmkit generate``),
taking turns in interleaved rounds; the medians of the rounds are compared. The constrained side
answers a schema whose answer runs for dozens of tokens (an array of French sentences), so the
figure is the cost per token, not a shorter answer. Compile times: the first structure for a
tokenizer (building the engine's view of its vocabulary included), then a new schema with the
vocabulary already known.

    cd benchmarks && ../.venv/bin/python structured_overhead.py CKPT [CKPT ...] [--rounds 5] [--tokens 64]
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

from common import machine  # noqa: E402

import llmkit.core.decoding.steps as steps  # noqa: E402
from llmkit.core.config import SampleConfig  # noqa: E402
from llmkit.core.decoding.decoder import Decoder  # noqa: E402
from llmkit.core.decoding.structure import Grammars, Matcher, Structure, compile_structure  # noqa: E402
from llmkit.core.interop.resolve import open_checkpoint, open_model  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "titre": {"type": "string", "maxLength": 60},
        "phrases": {
            "type": "array",
            "items": {"type": "string", "minLength": 40, "maxLength": 120},
            "minItems": 6,
            "maxItems": 6,
        },
    },
    "required": ["titre", "phrases"],
    "additionalProperties": False,
}
OTHER = {"type": "object", "properties": {"ville": {"enum": ["Paris", "Lyon"]}, "n": {"type": "integer"}}}
PROMPTS = [
    "Écris six phrases sur Paris en JSON.",
    "Décris la Loire en six phrases, en JSON.",
    "Six phrases sur la cuisine lyonnaise, en JSON.",
    "Raconte une journée à Marseille en six phrases JSON.",
    "Six phrases sur les Alpes, au format JSON.",
    "Décris une bibliothèque en six phrases JSON.",
    "Six phrases sur le vin de Bordeaux, en JSON.",
    "Écris six phrases sur la Bretagne en JSON.",
]


SPENT = [0.0]
"""Seconds spent inside the constraint itself (masks computed and applied, tokens accepted)."""


def _clocked(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[0] += time.perf_counter() - t0

    return wrapper


steps.constrain = _clocked(steps.constrain)
Matcher.accept = _clocked(Matcher.accept)


def timed(decoder: Decoder, prompts: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = [out for batch in decoder.run(prompts) for _, out in batch]
    return time.perf_counter() - t0, sum(len(o.ids) for o in outs)


def rate(whole: Decoder, first: Decoder, prompts: list[str]) -> tuple[float, int]:
    """Tokens per second after the first one: the prompts' prefill (and first token), timed by a run
    that stops there, is taken out, so an answer that ends early is not charged more prefill per token."""
    t_first, n_first = timed(first, prompts)
    t_whole, n_whole = timed(whole, prompts)
    return (n_whole - n_first) / max(t_whole - t_first, 1e-9), n_whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per answer (the budget of both sides)")
    args = ap.parse_args()
    print(json.dumps({"event": "machine", **machine()}), flush=True)
    for name in args.checkpoints:
        model, ckpt = open_model(open_checkpoint(Path(name)), "cpu")
        tok = ckpt.tokenizer
        template = "chat" if tok.chat_template else None
        Grammars._cache.clear()
        t0 = time.perf_counter()
        compile_structure(Structure.json_schema(SCHEMA), tok, tok.eos_id)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        compile_structure(Structure.json_schema(OTHER), tok, tok.eos_id)
        other = time.perf_counter() - t0
        row = {"model": Path(name).name, "vocab": tok.vocab_size, "compile_first_s": round(first, 3),
               "compile_next_ms": round(other * 1e3, 2)}  # fmt: skip
        for batch in (1, 8):
            sides = {}
            for side, structure in (("plain", None), ("schema", Structure.json_schema(SCHEMA))):
                sides[side] = [
                    Decoder(
                        model,
                        tok,
                        SampleConfig(max_new_tokens=n, temperature=0.0, batch_size=batch),
                        "cpu",
                        template=template,
                        structure=structure,
                    )  # fmt: skip
                    for n in (args.tokens, 1)
                ]
            prompts = PROMPTS[:batch]
            for whole, first in sides.values():  # warm both paths once
                rate(whole, first, prompts[:1])
            rates: dict[str, list[float]] = {"plain": [], "schema": []}
            tokens = {}
            SPENT[0], steps_held = 0.0, 0
            for _ in range(args.rounds):  # interleaved: a busy moment hits both sides alike
                for side, (whole, first) in sides.items():
                    r, n = rate(whole, first, prompts)
                    rates[side].append(r)
                    tokens[side] = n
                    steps_held += n if side == "schema" else 0
            p, s = statistics.median(rates["plain"]), statistics.median(rates["schema"])
            # The constraint's own share: its seconds per token (the prefill runs included) against
            # plain decoding's seconds per token, a figure a noisy machine moves far less.
            own = SPENT[0] / max(steps_held, 1)
            row[f"batch{batch}"] = {"plain_tok_s": round(p, 1), "schema_tok_s": round(s, 1),
                                    "overhead_pct": round(100 * (p / s - 1), 1), "tokens": tokens,
                                    "constraint_us_per_token": round(own * 1e6, 1),
                                    "constraint_pct_of_plain": round(100 * own * p, 2)}  # fmt: skip
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
