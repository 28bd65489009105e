"""Helpers shared by the benchmark scripts: shapes, weight conversion to Hugging Face, JSON output."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def emit(**row) -> None:
    """One JSON line per result on stdout."""
    print(json.dumps(row), flush=True)


def machine() -> dict:
    from llmkit.core.device import cpu_has_native_bf16

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_native_bf16": cpu_has_native_bf16(), "platform": sys.platform}


def hf_llama(model):
    """A transformers LlamaForCausalLM with the same shape and weights as an llmkit Transformer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ff_dim,
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
                         max_position_embeddings=c.context, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                         tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
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
