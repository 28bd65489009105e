"""Hugging Face model folders: ``config.json`` + safetensors (one file or shards with an index).

Architectures: those of ``families.py`` — Llama (1, 2, 3, 3.x with its RoPE scaling), Mistral,
Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 and GPT-2 (SmolLM/SmolLM2 and TinyLlama are Llama). Rotary
embeddings use the same half-split pairing as llmkit's, so no weight is permuted. Anything else is
refused in one line that names it.
"""

from __future__ import annotations

import json
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
from llmkit.core.interop.families import (
    Family,
    config_from_hf,
    config_to_hf,
    family_of_hf,
    family_of_model,
    from_hf,
    to_hf,
)
from llmkit.core.interop.folder import member
from llmkit.core.model import fast
from llmkit.core.model.transformer import Transformer
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.store.checkpoint import build_model


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


def read_tensors(folder: Path, family: Family, d_model: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(llmkit name, fp32 tensor) for every weight, one tensor in memory at a time."""
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield from from_hf(family, name, f.get_tensor(name).float(), d_model)
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
    where = str(src / "config.json")
    section = config_from_hf(hf, where)
    tokenizer = tokenizer_io.from_hf_folder(src, hf)
    tensors = dict(read_tensors(src, family_of_hf(hf, where), section["d_model"]))
    if "lm_head.weight" not in tensors:  # no head of its own, whatever the config says: it is the embedding
        section["tie_embeddings"] = True
    elif section["tie_embeddings"]:
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
    tensors = to_hf(family_of_model(m), state, model.cfg.norm_offset)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
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
