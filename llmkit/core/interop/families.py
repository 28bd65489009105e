"""The model families of Hugging Face folders: each one's ``config.json`` as llmkit's named model
options, and its tensor names.

One table, ``FAMILIES``: Llama (1–3.x, SmolLM, TinyLlama), Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3
(the text model, ``gemma3_text``) and GPT-2. Every family is llmkit's one network with some of
``ModelConfig``'s options set (``Family.options``); a folder is read by renaming its tensors
(GPT-2 also splits its fused query/key/value matrix and transposes its ``Conv1D`` weights), and a
model is written back as the family its options spell. Whatever llmkit would compute differently
(another activation, a RoPE scaling it does not have, a layer pattern that is not periodic) is
refused in one line naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from llmkit.core.config import ModelConfig
from llmkit.core.errors import CheckpointError

LLAMA_BLOCK = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}
"""llmkit's module in a block <- the Hugging Face module in a layer."""
QK_NORMS = {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
GEMMA_NORMS = {
    "attn_norm": "input_layernorm",
    "attn_post_norm": "post_attention_layernorm",  # Llama's name for the norm *before* the MLP
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}
GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "attn.o_proj": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
GPT2_TOP = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
GEMMA = {"norm_offset": 1.0, "post_norms": True, "mlp": "geglu", "embed_scale": True}
GPT2 = {"norm": "layer", "mlp": "gelu", "bias": True, "positions": "learned", "attn_bias": True}


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    """The ``transformers`` class that loads it."""
    block: dict[str, str]
    top: dict[str, str] = field(default_factory=lambda: TOP)
    options: dict[str, Any] = field(default_factory=dict)
    """The ModelConfig options that make llmkit's network this family's (beyond the defaults)."""
    tied: bool = True
    """Whether its output head is the embedding when config.json does not say."""
    layers: str = "model.layers"


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", LLAMA_BLOCK),
        Family("mistral", "MistralForCausalLM", LLAMA_BLOCK, tied=False),
        Family("qwen2", "Qwen2ForCausalLM", LLAMA_BLOCK, options={"attn_bias": True}),
        Family("qwen3", "Qwen3ForCausalLM", {**LLAMA_BLOCK, **QK_NORMS}, options={"qk_norm": True}, tied=False),
        Family("gemma2", "Gemma2ForCausalLM", {**LLAMA_BLOCK, **GEMMA_NORMS}, options=GEMMA),
        Family(
            "gemma3_text",
            "Gemma3ForCausalLM",
            {**LLAMA_BLOCK, **GEMMA_NORMS, **QK_NORMS},
            options={**GEMMA, "qk_norm": True},
        ),  # fmt: skip
        Family("gpt2", "GPT2LMHeadModel", GPT2_BLOCK, top=GPT2_TOP, options=GPT2, layers="transformer.h"),
    )
}
SHAPES = ("norm", "post_norms", "qk_norm", "mlp", "bias", "positions", "embed_scale")
"""The options that decide which family a model is (the rest are sizes and numbers; norm_offset is
how the norm weights are stored, converted on the way out)."""


def shift_norms(state: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    """``state`` with ``by`` added to every norm weight (the scale a norm applies is offset + w)."""
    if not by:
        return state
    return {k: (v.float() + by if k.endswith("norm.weight") else v) for k, v in state.items()}


def family_of_model(m: dict[str, Any]) -> Family:
    """The family whose options a model section has: what its export is written as."""
    defaults = ModelConfig.__dataclass_fields__

    def shape(options: dict[str, Any]) -> tuple:
        return tuple(options.get(k, defaults[k].default) for k in SHAPES)

    ours = shape(m)
    if ours == shape({}):  # Llama's shape: Qwen2 is Llama with attention biases
        return FAMILIES["qwen2" if m.get("attn_bias") else "llama"]
    for f in FAMILIES.values():
        if shape(f.options) == ours:
            return f
    changed = [k for k in SHAPES if m.get(k, defaults[k].default) != defaults[k].default]
    raise CheckpointError(
        f"no Hugging Face family has this model's options ({', '.join(f'{k}={m.get(k)!r}' for k in changed)}): "
        f"families are {', '.join(FAMILIES)}"
    )


# --- config.json -> llmkit's model section ---------------------------------------------------------


def family_of_hf(hf: dict[str, Any], where: str) -> Family:
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise CheckpointError(
            f"{where}: model_type 'gemma3' is Gemma 3's vision-language model; llmkit reads its text "
            "model (gemma3_text, e.g. gemma-3-270m and gemma-3-1b)"
        )
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(llmkit reads {', '.join(FAMILIES)}; SmolLM and TinyLlama are llama)"
        )
    return FAMILIES[model_type]


def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """llmkit's model section from a ``config.json``; refuses what llmkit would compute wrongly, and
    a file written by a stranger with fields of the wrong type (a list, a string, zero heads) in
    one line naming it."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: config.json must hold a JSON object, not {type(hf).__name__}")
    try:
        return _config_from_hf(hf, where)
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise CheckpointError(f"{where}: a field of config.json has a wrong type or value ({e})") from None


def _config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    family = family_of_hf(hf, where)
    if family.model_type == "gpt2":
        return _gpt2_config(hf, where)
    key = "hidden_activation" if family.options.get("post_norms") else "hidden_act"
    want = "silu" if family.options.get("mlp", "swiglu") == "swiglu" else "gelu_pytorch_tanh"
    act = hf.get(key) or want
    if act != want and not (want == "gelu_pytorch_tanh" and act == "gelu_new"):
        raise CheckpointError(f"{where}: {key} {act!r} is not supported ({family.model_type} with {want} is)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias is not supported")
    try:
        d_model, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        section: dict[str, Any] = {
            **family.options,
            "vocab_size": int(hf["vocab_size"]),
            "d_model": d_model,
            "n_layer": int(hf["num_hidden_layers"]),
            "n_head": n_head,
            "n_kv_head": int(hf.get("num_key_value_heads") or n_head),
            "d_ff": int(hf["intermediate_size"]),
            "context": int(hf.get("max_position_embeddings") or 2048),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "dropout": 0.0,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", family.tied)),
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: no {e.args[0]!r} in config.json") from None
    head_dim = hf.get("head_dim")
    if head_dim and int(head_dim) != d_model // n_head:
        section["d_head"] = int(head_dim)
    if hf.get("attention_bias") is not None:
        section["attn_bias"] = bool(hf["attention_bias"])
    if family.options.get("post_norms"):
        _gemma_config(hf, section, where)
    else:
        section.update(_rope(hf, hf.get("rope_parameters") or {}, where))
        window = hf.get("sliding_window")
        if window and (family.model_type == "mistral" or hf.get("use_sliding_window")):
            # Sliding-window attention equals full attention up to the window: cap the context there.
            section["context"] = min(section["context"], int(window))
    return section


def _rope(hf: dict[str, Any], params: dict[str, Any], where: str) -> dict[str, Any]:
    """RoPE base and scaling from the legacy keys (``rope_theta``, ``rope_scaling``) or
    transformers 5's ``rope_parameters`` (``params``: the model's, or one layer type's)."""
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return out
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(scaling["factor"]))
    elif kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_context=int(scaling["original_max_position_embeddings"]),
        )
    elif kind not in (None, "default"):
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported (linear and llama3 are)")
    return out


def _gemma_config(hf: dict[str, Any], section: dict[str, Any], where: str) -> None:
    """Gemma 2/3: query scale, window and layer pattern, per-layer-type RoPE, soft-capping."""
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{where}: bidirectional attention (an encoder, EmbeddingGemma) is not supported")
    if section.get("attn_bias"):
        raise CheckpointError(f"{where}: attention_bias is not supported for Gemma")
    section["attn_scale"] = float(hf.get("query_pre_attn_scalar") or section.get("d_head") or 256)
    section["norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
    n = section["n_layer"]
    default_every = 6 if hf.get("model_type") == "gemma3_text" else 2
    every = int(hf.get("sliding_window_pattern") or default_every)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise CheckpointError(f"{where}: layer_types must list one type per layer ({n})")
    globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
    if any(t not in ("full_attention", "sliding_attention") for t in types):
        raise CheckpointError(f"{where}: layer_types holds a type llmkit does not compute: {sorted(set(types))}")
    window = int(hf.get("sliding_window") or 0)
    if window and len(globals_) < n:
        every = globals_[0] + 1 if globals_ else 0
        if [i for i in range(n) if every and (i + 1) % every == 0] != globals_:
            raise CheckpointError(f"{where}: layer_types is not a repeating pattern of windowed and global layers")
        section.update(window=window, global_every=every)
    params = hf.get("rope_parameters") or {}
    full = params.get("full_attention", params) if isinstance(params, dict) else {}
    section.update(_rope(hf, full, where))
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    theta = (local or {}).get("rope_theta") or hf.get("rope_local_base_freq")
    if section.get("window") and theta and float(theta) != section["rope_theta"]:
        section["rope_local_theta"] = float(theta)
    for key, ours in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "logit_softcap")):
        if hf.get(key):
            section[ours] = float(hf[key])


def _gpt2_config(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{where}: activation_function {act!r} is not supported (gelu_new is)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError(f"{where}: GPT-2 attention scaled other than by 1/sqrt(head size) is not supported")
    try:
        d_model = int(hf["n_embd"])
        return {
            **GPT2,
            "vocab_size": int(hf["vocab_size"]),
            "d_model": d_model,
            "n_layer": int(hf["n_layer"]),
            "n_head": int(hf["n_head"]),
            "d_ff": int(hf.get("n_inner") or 4 * d_model),
            "context": int(hf.get("n_positions") or 1024),
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "dropout": 0.0,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: no {e.args[0]!r} in config.json") from None


# --- llmkit's model section -> config.json ---------------------------------------------------------


def config_to_hf(m: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` for llmkit's model section, as the family its options spell."""
    family = family_of_model(m)
    head_dim = m.get("d_head") or m["d_model"] // m["n_head"]
    if family.model_type == "gpt2":
        return {
            "architectures": [family.architecture],
            "model_type": "gpt2",
            "vocab_size": m["vocab_size"],
            "n_embd": m["d_model"],
            "n_layer": m["n_layer"],
            "n_head": m["n_head"],
            "n_inner": m["d_ff"],
            "n_positions": m["context"],
            "layer_norm_epsilon": m["norm_eps"],
            "activation_function": "gelu_new",
            "tie_word_embeddings": m["tie_embeddings"],
            "torch_dtype": "float32",
        }
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": m["vocab_size"],
        "hidden_size": m["d_model"],
        "intermediate_size": m["d_ff"],
        "num_hidden_layers": m["n_layer"],
        "num_attention_heads": m["n_head"],
        "num_key_value_heads": m["n_kv_head"] or m["n_head"],
        "max_position_embeddings": m["context"],
        "rms_norm_eps": m["norm_eps"],
        "rope_theta": m["rope_theta"],
        "tie_word_embeddings": m["tie_embeddings"],
        "torch_dtype": "float32",
        "head_dim": head_dim,
    }
    if family.options.get("post_norms"):
        window, every = m.get("window") or 0, m.get("global_every") or 0
        hf.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=_whole(m.get("attn_scale") or head_dim),
            sliding_window=window or m["context"],
            layer_types=[
                "sliding_attention" if window and (not every or (i + 1) % every) else "full_attention"
                for i in range(m["n_layer"])
            ],
            attn_logit_softcapping=m.get("attn_softcap") or None,
            final_logit_softcapping=m.get("logit_softcap") or None,
            attention_bias=False,
        )
        if family.model_type == "gemma3_text":
            hf["rope_local_base_freq"] = m.get("rope_local_theta") or m["rope_theta"]
    else:
        hf.update(hidden_act="silu", attention_bias=bool(m.get("attn_bias")))
        if family.model_type == "llama":
            hf["mlp_bias"] = False
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
    if m.get("rope_scaling") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": m["rope_factor"]}
    elif m.get("rope_scaling") == "llama3":
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": m["rope_factor"],
            "low_freq_factor": m["rope_low_freq_factor"],
            "high_freq_factor": m["rope_high_freq_factor"],
            "original_max_position_embeddings": m["rope_original_context"],
        }
    return hf


def _whole(x: float) -> int | float:
    """A number as transformers' strict configs want it: an int where it is whole."""
    return int(x) if float(x).is_integer() else x


# --- tensors --------------------------------------------------------------------------------------


_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
"""GPT-2's ``Conv1D`` layers: weights stored (in, out), the transpose of ``nn.Linear``'s."""


def from_hf(family: Family, name: str, tensor: torch.Tensor, d_model: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(llmkit name, tensor) for one Hugging Face tensor; nothing for one llmkit has no use for
    (GPT-2's stored causal masks, rotary tables)."""
    if family.model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        name = "transformer." + name  # the original checkpoints name the trunk without its prefix
    for ours, theirs in family.top.items():
        if name == theirs:
            yield ours, tensor
            return
    prefix = family.layers + "."
    if not name.startswith(prefix):
        return
    index, _, rest = name[len(prefix) :].partition(".")
    module, _, kind = rest.rpartition(".")
    if not index.isdigit() or kind not in ("weight", "bias"):
        return
    if family.model_type == "gpt2" and module in _GPT2_CONV1D and kind == "weight":
        tensor = tensor.t()  # (in, out) -> (out, in)
    if family.model_type == "gpt2" and module == "attn.c_attn":  # queries, keys, values in one
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.split(d_model, dim=0)):
            yield f"blocks.{index}.attn.{part}.{kind}", chunk.contiguous()
        return
    for ours, theirs in family.block.items():
        if module == theirs:
            yield f"blocks.{index}.{ours}.{kind}", tensor.contiguous()
            return


def to_hf(family: Family, state: dict[str, torch.Tensor], norm_offset: float = 0.0) -> dict[str, torch.Tensor]:
    """Hugging Face names (and GPT-2's layouts) for llmkit's state dict, whose norms scale by
    ``norm_offset`` + w (the family's own offset is taken off)."""
    state = shift_norms(state, norm_offset - family.options.get("norm_offset", 0.0))
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name in family.top:
            out[family.top[name]] = tensor
            continue
        m = _OURS_BLOCK.match(name)
        index, module, kind = m.groups() if m else (None, None, None)
        if family.model_type == "gpt2" and module in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            fused.setdefault((index, kind), {})[module] = tensor
            continue
        if not m or module not in family.block:
            raise CheckpointError(f"no {family.model_type} name for tensor {name!r}")
        theirs = family.block[module]
        if family.model_type == "gpt2" and theirs in _GPT2_CONV1D and kind == "weight":
            tensor = tensor.t()
        out[f"{family.layers}.{index}.{theirs}.{kind}"] = tensor.contiguous()
    for (index, kind), parts in fused.items():
        qkv = torch.cat([parts[f"attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")], dim=0)  # (3C, C) or (3C,)
        out[f"{family.layers}.{index}.attn.c_attn.{kind}"] = (qkv.t() if kind == "weight" else qkv).contiguous()
    return out
