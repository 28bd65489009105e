"""Training throughput: llmkit vs Hugging Face LlamaForCausalLM, same shapes, same weights.

Each round times one optimizer step (forward, backward, AdamW) of each contender in turn
(interleaved, so machine noise hits both alike); the median over rounds is reported with the
llmkit/peer ratio. Also measures fp32 against bf16 autocast for llmkit (the 'auto' precision
choice of llmkit/core/host/device.py rests on this).

    .venv/bin/python benchmarks/train_throughput.py [--rounds 12] [--shapes tiny,small]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import emit, hf_llama, machine

from llmkit.core.config import ModelConfig, build_section, load_preset
from llmkit.core.model.transformer import Transformer


def shape(name: str, vocab: int) -> tuple[ModelConfig, int]:
    preset = load_preset(name)
    cfg = build_section(ModelConfig, {**preset["model"], "vocab_size": vocab, "dropout": 0.0}, "model")
    return cfg, preset["train"]["batch_size"]


def step_fn(model, opt, x, y, hf: bool, amp: torch.dtype | None):
    def run():
        with torch.autocast("cpu", dtype=amp) if amp else torch.autocast("cpu", enabled=False):
            logits = model(x).logits if hf else model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--shapes", default="tiny,small")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--bf16", action="store_true", help="also time llmkit under bf16 autocast")
    args = ap.parse_args()
    emit(event="machine", **machine())
    for name in args.shapes.split(","):
        cfg, batch = shape(name, args.vocab)
        torch.manual_seed(0)
        ours = Transformer(cfg).train()
        peer = hf_llama(ours).train()
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.context))
        y = torch.randint(0, cfg.vocab_size, (batch, cfg.context))
        contenders = {
            "llmkit_fp32": step_fn(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), x, y, False, None),
            "transformers_fp32": step_fn(peer, torch.optim.AdamW(peer.parameters(), lr=1e-4), x, y, True, None),
        }
        if args.bf16:
            ours_bf = Transformer(cfg).train()
            contenders["llmkit_bf16_autocast"] = step_fn(
                ours_bf, torch.optim.AdamW(ours_bf.parameters(), lr=1e-4), x, y, False, torch.bfloat16
            )
        for fn in contenders.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.rounds):
            for key, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        tokens = batch * cfg.context
        med = {k: statistics.median(v) for k, v in times.items()}
        for key, m in med.items():
            emit(
                event="train_step",
                shape=name,
                contender=key,
                params=ours.num_params(),
                batch=batch,
                context=cfg.context,
                median_s=round(m, 4),
                tokens_per_s=round(tokens / m),
                ratio_vs_transformers=round(med["transformers_fp32"] / m, 3),
            )


if __name__ == "__main__":
    main()
