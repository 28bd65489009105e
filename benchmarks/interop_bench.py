"""Interop on the shared SmolLM2-135M-Instruct GGUF: import time and peak memory, and greedy decoding
speed against transformers on the same weights (identical tokens checked), interleaved.

    cd benchmarks && ../.venv/bin/python interop_bench.py [--rounds 3] [--new 64]

Prints one JSON line per result (see docs/benchmarks.md for the table).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, emit, machine, peak_of

GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "La Révolution française a commencé en",
    "The quickest way to learn a language is",
    "Le fromage de Comté est fabriqué",
    "Once upon a time, in a small village,",
    "Les abeilles sont importantes parce que",
    "Python is a programming language that",
    "La tour Eiffel mesure",
    "To make bread, you need",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    if not GGUF.is_file():
        sys.exit(f"{GGUF} not present (the shared models folder sits beside the repository)")
    emit(kind="machine", **machine())
    out = Path(tempfile.mkdtemp()) / "smol"
    seconds, peak = peak_of([sys.executable, "-m", "llmkit", "import", str(GGUF), "-o", str(out), "-q"])
    emit(
        kind="import",
        seconds=round(seconds, 2),
        peak_rss_mb=round(peak),
        gguf_mb=round(GGUF.stat().st_size / 2**20),
        fp32_mb=round((out / "model.safetensors").stat().st_size / 2**20),
    )

    from transformers import AutoModelForCausalLM

    from llmkit.core.config import SampleConfig
    from llmkit.core.decoding.steps import decode_batch
    from llmkit.core.interop.resolve import open_model

    ours, ckpt = open_model(out)
    tok = ckpt.tokenizer
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    theirs = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    for batch in (1, 8):
        prompts = [tok.encode(p) for p in PROMPTS[:batch]]
        width = max(map(len, prompts))
        # Same-length prompts (left-trimmed to the shortest) so both sides decode without padding.
        short = min(map(len, prompts))
        prompts = [p[-short:] for p in prompts]
        cfg = SampleConfig(max_new_tokens=args.new, temperature=0.0)
        times = {"llmkit": [], "transformers": []}
        same = True
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            outs = decode_batch(ours, prompts, cfg, eos_id=None, decode=tok.decode)
            times["llmkit"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = theirs.generate(
                    torch.tensor(prompts),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                    pad_token_id=tok.pad_id,
                )
            times["transformers"].append(time.perf_counter() - t0)
            same &= all(o.ids == r[short:].tolist() for o, r in zip(outs, ref))
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = batch * args.new
        emit(
            kind="decode",
            batch=batch,
            new_tokens=args.new,
            prompt_tokens=short,
            identical_greedy=same,
            llmkit_tok_s=round(tokens / med["llmkit"], 1),
            transformers_tok_s=round(tokens / med["transformers"], 1),
            ratio=round(med["transformers"] / med["llmkit"], 2),
            widest_prompt=width,
        )


if __name__ == "__main__":
    main()
