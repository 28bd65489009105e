"""Greedy generation speed: llmkit vs Hugging Face `LlamaForCausalLM.generate()`, same weights.

Prompt of 16 tokens, 256 new tokens, greedy, batch 1 and batch 8, no early end (EOS disabled on
both sides). Rounds are interleaved (llmkit b1, peer b1, llmkit b8, peer b8, …) and medians
reported with the llmkit/peer ratio. For batch 1 it also reports the weight bandwidth achieved:
bytes of weights read per second (each new token reads every weight once).

    .venv/bin/python benchmarks/generate_speed.py [--rounds 3] [--new 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import emit, hf_llama, machine

from llmkit.core.config import ModelConfig, SampleConfig
from llmkit.core.decoding.steps import decode_batch
from llmkit.core.model.transformer import Transformer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    emit(event="machine", **machine())
    # The `small` preset's shape, with a context long enough for prompt + new tokens.
    cfg = ModelConfig(vocab_size=8192, context=512, d_model=384, n_layer=6, n_head=6, n_kv_head=2)
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    peer = hf_llama(ours)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    sample = SampleConfig(max_new_tokens=args.new, temperature=0.0)

    def run_ours(prompts):
        outs = decode_batch(ours, prompts.tolist(), sample, eos_id=None, decode=lambda ids: "")
        return [o.ids for o in outs]

    @torch.inference_mode()
    def run_peer(prompts):
        out = peer.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            do_sample=False,
            num_beams=1,
            pad_token_id=3,
            eos_token_id=None,
        )
        return out[:, prompts.size(1) :].tolist()

    batches = [int(b) for b in args.batches.split(",")]
    prompts = {b: torch.randint(4, cfg.vocab_size, (b, args.prompt)) for b in batches}
    for b in batches:  # warm-up, and a check that both decode the same greedy tokens
        same = run_ours(prompts[b]) == run_peer(prompts[b])
        emit(event="parity", batch=b, identical_greedy_tokens=same)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in batches:
            for name, fn in (("llmkit", run_ours), ("transformers", run_peer)):
                t0 = time.perf_counter()
                fn(prompts[b])
                times.setdefault((name, b), []).append(time.perf_counter() - t0)
    for b in batches:
        med = {name: statistics.median(times[(name, b)]) for name in ("llmkit", "transformers")}
        for name, m in med.items():
            row = dict(
                event="generate",
                contender=name,
                batch=b,
                prompt=args.prompt,
                new_tokens=args.new,
                params=ours.num_params(),
                median_s=round(m, 3),
                new_tokens_per_s=round(b * args.new / m, 1),
                ratio_vs_transformers=round(med["transformers"] / m, 3),
            )
            if b == 1:
                row["weight_GB_per_s"] = round(weight_bytes * args.new / m / 1e9, 2)
            emit(**row)


if __name__ == "__main__":
    main()
