"""Helpers shared by the benchmark scripts: shapes, weight conversion to Hugging Face, JSON output."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def emit(**row) -> None:
    """One JSON line per result on stdout."""
    print(json.dumps(row), flush=True)


def cpu_model() -> str:
    from llmkit.core.host.machine import cpu_model as from_cpuinfo

    found = from_cpuinfo()
    return found if found != "unknown" else (platform.processor() or "unknown")


# What each kernel library is told, to run a processor as one with only AVX2: ATen's own kernels,
# oneDNN (convolutions, bf16 products) and MKL (fp32 products).
ISA_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def cap_isa(isa: str | None) -> None:
    """Run this script again with its kernels capped to ``isa`` (``--isa avx2``): an AVX-512
    machine then measures the code an AVX2-only one runs. The caps must be set before the
    libraries load, hence a fresh process; they travel to every subprocess it starts."""
    if not isa:
        return
    caps = ISA_CAPS[isa]
    if all(os.environ.get(k) == v for k, v in caps.items()):
        return  # this is the capped run
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **caps})


def machine() -> dict:
    """What a figure was measured on: every benchmark prints it first."""
    from llmkit.core.host.device import cpu_has_native_bf16
    from llmkit.core.host.machine import cpu_flags, kernels

    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "cpu_flags": flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernels": kernels(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "platform": sys.platform,
    }


def hf_llama(model):
    """A transformers LlamaForCausalLM with the same shape and weights as an llmkit Transformer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.ff_dim,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.context,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    sd = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = b.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = b.mlp_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = getattr(b.attn, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{name}.weight"] = getattr(b.mlp, name).weight
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    if c.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def read_classify(name: str, split: str) -> tuple[list[str], list[str]]:
    rows = [
        json.loads(line) for line in (SHARED_DATA / "classify_fr" / f"{name}.{split}.jsonl").read_text().splitlines()
    ]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def logistic_probe(xtr: np.ndarray, ytr: list[str], xdv: np.ndarray, ydv: list[str], l2: float = 1e-3) -> dict:
    labels = sorted(set(ytr))
    index = {c: i for i, c in enumerate(labels)}
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a = torch.tensor((xtr - mu) / sd, dtype=torch.float32)
    b = torch.tensor((xdv - mu) / sd, dtype=torch.float32)
    y = torch.tensor([index[c] for c in ytr])
    w = torch.zeros(a.size(1), len(labels), requires_grad=True)
    bias = torch.zeros(len(labels), requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    pred = (b @ w + bias).argmax(1).tolist()
    gold = [index.get(c, -1) for c in ydv]
    acc = float(np.mean([p == g for p, g in zip(pred, gold)]))
    f1s = []
    for k in range(len(labels)):
        tp = sum(p == k and g == k for p, g in zip(pred, gold))
        fp = sum(p == k and g != k for p, g in zip(pred, gold))
        fn = sum(p != k and g == k for p, g in zip(pred, gold))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"accuracy": round(acc, 4), "macro_f1": round(float(np.mean(f1s)), 4)}


def bag_of_words(train: list[str], dev: list[str], vocab: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    words = lambda t: re.findall(r"\w+", t.lower())  # noqa: E731
    common = [w for w, _ in Counter(w for t in train for w in words(t)).most_common(vocab)]
    index = {w: i for i, w in enumerate(common)}

    def vec(texts):
        out = np.zeros((len(texts), len(common)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in words(t):
                if w in index:
                    out[r, index[w]] += 1
        return np.log1p(out)

    return vec(train), vec(dev)


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one command, measured by GNU time-like wait4 accounting."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(proc.stderr.read())
    return time.perf_counter() - t0, usage.ru_maxrss / 1024
