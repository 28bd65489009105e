"""Hugging Face model folders: ``config.json`` + safetensors (one file or shards with an index).

Architectures: Llama (1, 2, 3, 3.x with its RoPE scaling), Mistral, Qwen2/2.5 (attention biases),
SmolLM/SmolLM2 and TinyLlama (both Llama). They are all llmkit's network with other names: the
mapping below is the whole conversion (rotary embeddings use the same half-split pairing, so no
weight is permuted). Anything else — another ``model_type``, an activation other than SiLU, MLP
biases, a RoPE scaling llmkit does not compute — is refused in one line that names it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmkit.core import events
from llmkit.core.config import resolve_run_config
from llmkit.core.errors import CheckpointError
from llmkit.core.events import EventFn
from llmkit.core.interop import tokenizer_io
from llmkit.core.interop.folder import member
from llmkit.core.model import fast
from llmkit.core.model.transformer import Transformer
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.store.checkpoint import build_model

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llmkit name <- Hugging Face name, per block and for the whole model.
BLOCK = {
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
TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def to_llmkit_name(name: str) -> str | None:
    """llmkit's name of a Hugging Face tensor, or None for one llmkit has no use for."""
    for ours, theirs in TOP.items():
        if name == theirs:
            return ours
    m = _HF_BLOCK.match(name)
    if m:
        for ours, theirs in BLOCK.items():
            if m.group(2) == theirs:
                return f"blocks.{m.group(1)}.{ours}.{m.group(3)}"
    return None


def to_hf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    m = _OURS_BLOCK.match(name)
    if not m or m.group(2) not in BLOCK:
        raise CheckpointError(f"no Hugging Face name for tensor {name!r}")
    return f"model.layers.{m.group(1)}.{BLOCK[m.group(2)]}.{m.group(3)}"


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
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(llmkit reads {', '.join(ARCHITECTURES)}; SmolLM and TinyLlama are llama)"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias is not supported")
    try:
        d_model, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        section: dict[str, Any] = {
            "vocab_size": int(hf["vocab_size"]),
            "d_model": d_model,
            "n_layer": int(hf["num_hidden_layers"]),
            "n_head": n_head,
            "n_kv_head": int(hf.get("num_key_value_heads") or n_head),
            "d_ff": int(hf["intermediate_size"]),
            "context": int(hf.get("max_position_embeddings") or 2048),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "dropout": 0.0,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", model_type != "mistral")),
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: no {e.args[0]!r} in config.json") from None
    rope = hf.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling together here
    section["rope_theta"] = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    head_dim = hf.get("head_dim")
    if head_dim and int(head_dim) != d_model // n_head:
        section["d_head"] = int(head_dim)
    section["attn_bias"] = bool(hf.get("attention_bias", model_type == "qwen2"))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "linear":
            section.update(rope_scaling="linear", rope_factor=float(scaling["factor"]))
        elif kind == "llama3":
            section.update(
                rope_scaling="llama3",
                rope_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_context=int(scaling["original_max_position_embeddings"]),
            )
        elif kind not in (None, "default"):
            raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported (linear and llama3 are)")
    window = hf.get("sliding_window")
    if window and (model_type == "mistral" or hf.get("use_sliding_window")):
        # Sliding-window attention equals full attention up to the window: cap the context there.
        section["context"] = min(section["context"], int(window))
    return section


def config_to_hf(m: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` for llmkit's model section (Qwen2 when it has attention biases, else Llama)."""
    model_type = "qwen2" if m.get("attn_bias") else "llama"
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
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
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "head_dim": m.get("d_head") or m["d_model"] // m["n_head"],
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
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


def read_config(folder: Path) -> dict[str, Any]:
    path = member(folder, "config.json")
    if path is None:
        raise CheckpointError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json cannot be read: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: one, or the shards its index names (all must exist)."""
    index = member(folder, "model.safetensors.index.json")
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index} cannot be read: {e}") from None
        if not all(isinstance(s, str) for s in shards):
            raise CheckpointError(f"{index}: weight_map's values must be file names")
        files = [member(folder, s) for s in shards]
        missing = [s for s, f in zip(shards, files) if f is None]
        if missing:
            raise CheckpointError(f"{folder}: shard {missing[0]} named by model.safetensors.index.json is missing")
        return files
    single = member(folder, "model.safetensors")
    if single is not None:
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} holds PyTorch pickle weights (.bin/.pt), which llmkit never loads "
            "(unpickling runs code): convert them to safetensors first"
        )
    raise CheckpointError(f"{folder} has no model.safetensors (or sharded safetensors with an index)")


def read_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(llmkit name, fp32 tensor) for every weight, one tensor in memory at a time."""
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    ours = to_llmkit_name(name)
                    if ours is not None:
                        yield ours, f.get_tensor(name).float()
        except SafetensorError as e:
            raise CheckpointError(f"{file} cannot be read: {e}") from None


def check_shapes(tensors: dict[str, torch.Tensor], model_cfg, where: str) -> None:
    """Every tensor the network needs is there with its shape: a file that disagrees with its
    config is refused before anything is written."""
    with fast.building(), torch.device("meta"):
        ref = Transformer(model_cfg)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if model_cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing ({len(missing)} in all)")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, its config makes {shape}")


def write_checkpoint(
    dest: Path, tensors: dict[str, torch.Tensor], model_section: dict[str, Any], tokenizer, state: dict[str, Any]
) -> Path:
    """An llmkit checkpoint from converted tensors: the shared ending of every import."""
    cfg = resolve_run_config(base={"model": model_section, "tokenizer": {"vocab_size": max(tokenizer.vocab_size, 8)}})
    check_shapes(tensors, cfg.model, str(state.get("imported_from", dest)))
    if cfg.model.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return ckpt_io.save_checkpoint(
        dest, model=None, config=cfg.to_dict(), tokenizer=tokenizer, state=state, tensors=(tensors, None)
    )


def import_to(src: Path, dest: Path, *, on_event: EventFn = events.ignore) -> Path:
    hf = read_config(src)
    section = config_from_hf(hf, str(src / "config.json"))
    tokenizer = tokenizer_io.from_hf_folder(src, hf)
    tensors = dict(read_tensors(src))
    if section["tie_embeddings"] and "lm_head.weight" in tensors:
        if torch.equal(tensors["lm_head.weight"], tensors["embed.weight"]):
            tensors.pop("lm_head.weight")
        else:  # the config says tied, the file holds two different matrices: keep both
            section["tie_embeddings"] = False
    on_event(events.Import(source=str(src), format="hf", tensors=len(tensors)))
    return write_checkpoint(
        dest, tensors, section, tokenizer, base_state(src, "hf", {"architecture": hf["model_type"]})
    )


# --- writing a folder -------------------------------------------------------------------------------


def export_folder(ckpt, dest: Path, *, card: str) -> Path:
    """``dest`` as a folder ``transformers`` loads offline: config.json, generation_config.json,
    model.safetensors (fp32, Hugging Face names), the tokenizer files, README.md (the model card)."""

    if ckpt.kind == "classify":
        # LlamaForSequenceClassification scores the last real token with a bias-free layer; llmkit's
        # head has a bias (and may mean-pool): the exported model would classify differently.
        raise CheckpointError(
            f"{ckpt.path} is a classifier: its head (with a bias, {ckpt.task.pooling} pooling) has "
            "no exact LlamaForSequenceClassification equivalent, so it is not exported; export the "
            "language model it was fine-tuned from, or use llmkit classify/encode"
        )
    model = build_model(ckpt, "cpu", merge=True)
    dest.mkdir(parents=True, exist_ok=True)
    m = ckpt.config["model"]
    m = {**m, "d_ff": model.cfg.ff_dim, "n_kv_head": model.cfg.kv_heads}
    hf_cfg = config_to_hf(m)
    tok = ckpt.tokenizer
    hf_cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file({to_hf_name(k): v for k, v in state.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    write_json(dest / "config.json", hf_cfg)
    write_json(
        dest / "generation_config.json",
        {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id},
    )
    tokenizer_io.write_hf_tokenizer(tok, dest, context=model.cfg.context)
    (dest / "README.md").write_text(card, encoding="utf-8")
    return dest


def base_state(src: Path, kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """trainer_state.json of an imported model: step 0, where it came from."""
    return {
        "step": 0,
        "tokens_seen": 0,
        "kind": "lm",
        "imported_from": str(src),
        "source_format": kind,
        **(extra or {}),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
