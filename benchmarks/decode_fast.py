"""Decoding levers against transformers `generate()` on the same weights: int8 weights, a draft
model (speculative decoding), the model's own int8 twin as draft, prompt lookup — with the output
checks that make them usable.

    cd benchmarks && ../.venv/bin/python decode_fast.py TARGET [--draft DRAFT] [--rounds 3] [--new 128]

TARGET and DRAFT are llmkit checkpoints (a model you trained, or one made by `llmkit import`, such
as the shared SmolLM2 GGUF); the draft must share the target's tokenizer. Prompts are 16-token
openings of real French text (the last novel of ../shared/data/corpus_fr); EOS is disabled on
every side so each run writes exactly --new tokens. Batch 1 decodes each of 4 prompts in turn;
batch 8 decodes 8 together (speculative paths too: one pass checks every row's guesses). Rounds
are interleaved; medians are reported.

At batch 8 the int8 twin is left out: each row's draft decodes on its own (eight draft passes
per check), which does not pay there.

Checks printed with the figures: transformers and llmkit's plain path decode the same greedy
tokens; every speculative path decodes exactly the plain path's tokens; int8 agrees with fp32 on
a share of the tokens, and moves perplexity on a fixed text (4,096 tokens of the same novel's
end) by the percentage shown.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from common import SHARED_DATA, emit, hf_llama, machine

from llmkit.core.config import SampleConfig
from llmkit.core.decoding.speculative import DraftModel, PromptLookup, guesses_per_pass, speculative_batch
from llmkit.core.decoding.steps import decode_batch
from llmkit.core.interop.resolve import open_model
from llmkit.core.model.quantize import int8_copy, quantize_int8
from llmkit.core.training.loop import mean_token_loss


def french_text() -> str:
    files = sorted((SHARED_DATA / "corpus_fr").glob("*.txt"))
    return files[-1].read_text(encoding="utf-8")


def perplexity(model, ids: list[int], context: int) -> float:
    T = min(context, 256)
    rows = torch.tensor(ids[: (len(ids) // (T + 1)) * (T + 1)]).view(-1, T + 1)  # (N, T + 1)
    batches = [(rows[i : i + 8, :-1], rows[i : i + 8, 1:]) for i in range(0, rows.size(0), 8)]
    return math.exp(mean_token_loss(model, batches, "cpu").loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("--draft", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=0, help="0: as generate (4 with a draft, 8 for lookup)")
    args = ap.parse_args()
    emit(event="machine", **machine())
    plain, ckpt = open_model(args.target)
    tok = ckpt.tokenizer
    peer = hf_llama(plain)
    int8, _ = open_model(args.target)
    quantize_int8(int8)
    draft = open_model(args.draft)[0] if args.draft else None
    draft8 = quantize_int8(open_model(args.draft)[0]) if args.draft else None
    twin = int8_copy(plain)  # --draft int8: the model's own int8 twin guesses

    text = french_text()
    words = text[len(text) // 3 :].split()
    openings = [tok.encode_text(" ".join(words[i * 500 : i * 500 + 40]))[:16] for i in range(8)]
    tail = tok.encode_text(text[-60_000:])[-4096:]
    ppl, ppl8 = perplexity(plain, tail, plain.cfg.context), perplexity(int8, tail, plain.cfg.context)
    sample = SampleConfig(max_new_tokens=args.new, temperature=0.0)

    def batched(model):
        return lambda prompts: [o.ids for o in decode_batch(model, prompts, sample, eos_id=None, decode=tok.decode)]

    def speculative(model, propose, prompts):
        proposers = [propose() for _ in prompts]
        k = args.draft_tokens or guesses_per_pass(proposers[0])  # generate's defaults
        outs = speculative_batch(
            model, prompts, sample, proposers, eos_id=None, decode=tok.decode, device="cpu", draft_tokens=k
        )
        return outs, sum(o.accepted for o in outs) / max(sum(o.drafted for o in outs), 1)

    def one_by_one(model, propose=None):
        def run(prompts):
            if propose is None:
                return [decode_batch(model, [p], sample, eos_id=None, decode=tok.decode)[0].ids for p in prompts]
            outs = [speculative(model, propose, [p])[0][0] for p in prompts]
            run.acceptance = sum(o.accepted for o in outs) / max(sum(o.drafted for o in outs), 1)
            return [o.ids for o in outs]

        return run

    def together(model, propose):
        def run(prompts):
            outs, run.acceptance = speculative(model, propose, prompts)
            return [o.ids for o in outs]

        return run

    @torch.inference_mode()
    def transformers_run(prompts):
        x = torch.tensor(prompts)
        out = peer.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            do_sample=False,
            num_beams=1,
            pad_token_id=0,
            eos_token_id=None,
        )
        return out[:, x.size(1) :].tolist()

    def transformers_one_by_one(prompts):
        return [transformers_run([p])[0] for p in prompts]

    contenders = {
        1: {
            "transformers": transformers_one_by_one,
            "llmkit": one_by_one(plain),
            "llmkit int8": one_by_one(int8),
            "llmkit lookup": one_by_one(plain, lambda: PromptLookup(3)),
            "llmkit int8 + lookup": one_by_one(int8, lambda: PromptLookup(3)),
            "llmkit draft: int8 twin": one_by_one(plain, lambda: DraftModel(twin, "cpu")),
        },
        8: {
            "transformers": transformers_run,
            "llmkit": batched(plain),
            "llmkit int8": batched(int8),
            "llmkit lookup": together(plain, lambda: PromptLookup(3)),
            "llmkit int8 + lookup": together(int8, lambda: PromptLookup(3)),
        },
    }
    if draft is not None:
        contenders[1]["llmkit draft"] = one_by_one(plain, lambda: DraftModel(draft, "cpu"))
        contenders[1]["llmkit int8 + int8 draft"] = one_by_one(int8, lambda: DraftModel(draft8, "cpu"))
        contenders[8]["llmkit draft"] = together(plain, lambda: DraftModel(draft, "cpu"))
    prompts = {1: openings[:4], 8: openings[:8]}
    reference: dict[int, list[list[int]]] = {}
    checks: dict[tuple[int, str], object] = {}
    for b, fns in contenders.items():  # warm-up and output checks
        reference[b] = fns["llmkit"](prompts[b])
        for name, fn in fns.items():
            got = fn(prompts[b])
            if name.startswith("llmkit int8"):  # int8 weights decode: a share of fp32's tokens
                agree = sum(x == y for g, r in zip(got, reference[b]) for x, y in zip(g, r))
                checks[(b, name)] = f"{agree / (len(got) * args.new):.0%} of tokens as fp32"
            else:
                checks[(b, name)] = "identical" if got == reference[b] else "DIFFERENT"
    times: dict[tuple[int, str], list[float]] = {}
    acceptance: dict[str, float] = {}
    for _ in range(args.rounds):
        for b, fns in contenders.items():
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(prompts[b])
                times.setdefault((b, name), []).append(time.perf_counter() - t0)
                if hasattr(fn, "acceptance"):
                    acceptance[name] = fn.acceptance
    for b, fns in contenders.items():
        base = statistics.median(times[(b, "transformers")])
        for name in fns:
            m = statistics.median(times[(b, name)])
            emit(
                event="decode",
                model=str(args.target),
                params=plain.num_params(),
                batch=b,
                contender=name,
                new_tokens_per_s=round(len(prompts[b]) * args.new / m, 1),
                ratio_vs_transformers=round(base / m, 2),
                output=checks[(b, name)],
                acceptance=round(acceptance[name], 3) if name in acceptance else None,
            )
    emit(
        event="int8_perplexity",
        text_tokens=len(tail),
        fp32=round(ppl, 3),
        int8=round(ppl8, 3),
        change_pct=round(100 * (ppl8 / ppl - 1), 2),
    )


if __name__ == "__main__":
    if not SHARED_DATA.exists():
        sys.exit(f"skipped: {SHARED_DATA} not present")
    main()
