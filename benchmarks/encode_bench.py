"""`llmkit encode`: probe quality, speed against Hugging Face LlamaModel pooling, flat memory.

    .venv/bin/python benchmarks/encode_bench.py probe CKPT     # logistic-regression probes, classify_fr
    .venv/bin/python benchmarks/encode_bench.py speed CKPT     # items/s and peak memory vs LlamaModel
    .venv/bin/python benchmarks/encode_bench.py memory CKPT    # peak RSS of `llmkit encode`, 10k vs 200k lines

probe: vectors of the train split fit a multinomial logistic regression (L2, LBFGS, standardised
features), scored on the dev split, for mean and last pooling at a middle layer and the top; the
same regression on bag-of-words counts and the majority class are the baselines.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from common import SHARED_DATA, bag_of_words, emit, hf_llama, logistic_probe, machine, peak_of, read_classify

from llmkit.core.interop.resolve import open_model
from llmkit.core.model.heads import pool


@torch.inference_mode()
def pooled(model, tok, texts, layer, batch=32, max_len=128) -> dict[str, np.ndarray]:
    """Mean and last pooling of one layer in one pass (right padding is invisible to causal attention)."""
    rows = [r[:max_len] or [tok.bos_id] for r in tok.encode_batch(texts)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = {"mean": np.zeros((len(rows), model.cfg.d_model), np.float32), "last": None}
    out["last"] = out["mean"].copy()
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        T = max(len(rows[i]) for i in idx)
        ids = torch.tensor([rows[i] + [0] * (T - len(rows[i])) for i in idx])
        valid = torch.tensor([[True] * len(rows[i]) + [False] * (T - len(rows[i])) for i in idx])
        h = model.hidden_states(ids, layer=layer)
        for how in ("mean", "last"):
            out[how][idx] = pool(h, valid, how).numpy()
    return out


def probe(ckpt: str) -> None:
    model, c = open_model(Path(ckpt))
    tok = c.tokenizer
    layers = {"middle": model.cfg.n_layer // 2, "top": -1}
    for name in ("sib200_topic_fr", "theatre17_genre_fr"):
        xtr_t, ytr = read_classify(name, "train")
        xdv_t, ydv = read_classify(name, "dev")
        majority = Counter(ytr).most_common(1)[0][0]
        emit(
            event="probe",
            data=name,
            features="majority class",
            accuracy=round(float(np.mean([y == majority for y in ydv])), 4),
        )
        btr, bdv = bag_of_words(xtr_t, xdv_t)
        emit(event="probe", data=name, features="bag of words", **logistic_probe(btr, ytr, bdv, ydv))
        for lname, layer in layers.items():
            t0 = time.perf_counter()
            tr, dv = pooled(model, tok, xtr_t, layer), pooled(model, tok, xdv_t, layer)
            for how in ("mean", "last"):
                emit(
                    event="probe",
                    data=name,
                    features=f"llmkit {how} pooling, {lname} layer ({layer})",
                    seconds=round(time.perf_counter() - t0, 1),
                    **logistic_probe(tr[how], ytr, dv[how], ydv),
                )


@torch.inference_mode()
def peer_mean_pool(peer, rows: list[list[int]], dim: int, batch: int) -> np.ndarray:
    """sentence-transformers style over a Hugging Face LlamaModel: length-sorted batches, attention
    mask, mean over real tokens; every vector kept in memory."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = np.zeros((len(rows), dim), np.float32)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        T = max(len(rows[i]) for i in idx)
        ids = torch.tensor([rows[i] + [0] * (T - len(rows[i])) for i in idx])
        mask = torch.tensor([[1] * len(rows[i]) + [0] * (T - len(rows[i])) for i in idx])
        h = peer(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C)
        m = mask[..., None].float()
        out[idx] = ((h * m).sum(1) / m.sum(1)).numpy()
    return out


def speed(ckpt: str, rounds: int = 5) -> None:
    model, c = open_model(Path(ckpt))
    tok = c.tokenizer
    peer = hf_llama(model).model  # the LlamaModel trunk
    texts = read_classify("sib200_topic_fr", "train")[0] * 2
    from llmkit.core.config import EmbedConfig
    from llmkit.core.tasks.retrieval import embed_items

    def hf_mean(texts):
        return peer_mean_pool(peer, [r[:128] for r in tok.encode_batch(texts)], model.cfg.d_model, batch=32)

    ours = lambda texts: embed_items(model, tok, texts, EmbedConfig(max_length=128))[0]  # noqa: E731
    a, b = ours(texts[:64]), hf_mean(texts[:64])
    emit(event="parity", max_abs_diff=float(np.abs(a - b).max()))
    times = {"llmkit": [], "transformers": []}
    for _ in range(rounds):
        for name, fn in (("llmkit", ours), ("transformers", hf_mean)):
            t0 = time.perf_counter()
            fn(texts)
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, m in med.items():
        emit(
            event="encode_speed",
            contender=k,
            items=len(texts),
            items_per_s=round(len(texts) / m, 1),
            ratio_vs_transformers=round(med["transformers"] / m, 3),
        )


def peer_encode(ckpt: str, src: str, out: str) -> None:
    """The peer's way, in its own process: LlamaModel + mean pooling, every vector kept in RAM, then saved."""
    model, c = open_model(Path(ckpt))
    peer = hf_llama(model).model
    texts = [line for line in Path(src).read_text().splitlines() if line.strip()]
    vectors = peer_mean_pool(peer, c.tokenizer.encode_batch(texts), model.cfg.d_model, batch=64)
    np.save(out, vectors)


def memory(ckpt: str) -> None:
    """Peak RSS on 10k and 200k synthetic lines: the real `llmkit encode` command against the peer's
    in-memory pooling, each in its own process."""
    words = "le la les un une de du des pain mer ville langue maison rivière forêt soleil".split()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (10_000, 200_000):
            src = Path(tmp) / f"{n}.txt"
            src.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(n)) + "\n")
            out = Path(tmp) / f"{n}.npy"
            runs = {
                "llmkit": [
                    sys.executable,
                    "-m",
                    "llmkit",
                    "encode",
                    ckpt,
                    str(src),
                    "-o",
                    str(out),
                    "--quiet",
                    "--batch-size",
                    "64",
                ],
                "transformers": [
                    sys.executable,
                    str(Path(__file__)),
                    "peer",
                    ckpt,
                    "--src",
                    str(src),
                    "--out",
                    str(Path(tmp) / f"{n}.peer.npy"),
                ],
            }
            for name, cmd in runs.items():
                seconds, peak = peak_of(cmd)
                emit(
                    event="encode_memory",
                    contender=name,
                    lines=n,
                    seconds=round(seconds, 1),
                    peak_rss_mb=round(peak, 1),
                )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["probe", "speed", "memory", "peer"])
    ap.add_argument("checkpoint")
    ap.add_argument("--src")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.which == "peer":  # internal: the peer's side of `memory`, in its own process
        return peer_encode(args.checkpoint, args.src, args.out)
    if not SHARED_DATA.exists():
        sys.exit(f"skipped: {SHARED_DATA} not present")
    emit(event="machine", **machine())
    {"probe": probe, "speed": speed, "memory": memory}[args.which](args.checkpoint)


if __name__ == "__main__":
    main()
