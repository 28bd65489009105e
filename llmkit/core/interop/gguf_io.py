"""GGUF files (llama.cpp, Ollama, LM Studio) read and written with the ``gguf`` package.

Reading: the architectures of ``GGUF_ARCHS`` — ``llama`` (Llama 1–3, Mistral, SmolLM, TinyLlama),
``qwen2``, ``qwen3``, ``gemma2``, ``gemma3`` and ``gpt2``; tensors in F32, F16, BF16, Q8_0, Q5_0,
Q5_1, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K are dequantised to fp32 by ``gguf.quants`` (llama.cpp's own
reference code). What llama.cpp's converter changed is undone: the row permutation of Llama's query
and key projections (its RoPE pairs neighbouring dimensions there, ours the two halves), GPT-2's
fused query/key/value matrix. Gemma's norm weights are stored as the scale itself (1 + w): llmkit
keeps them so (``norm_offset`` 0), which computes the very same numbers and keeps a GGUF round
trip exact. What llama.cpp fixes in code rather than in the file is supplied as it does (Gemma 3's
layer pattern and local RoPE base, Gemma's query scale). Anything else is refused in one line.

Writing: f32, f16 or q8_0 weights (norms and biases stay f32, as llama.cpp expects), in the
layout llama.cpp reads, the tokenizer and chat template embedded.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.core import events
from llmkit.core.config import ModelConfig
from llmkit.core.errors import CheckpointError
from llmkit.core.events import EventFn
from llmkit.core.interop import tokenizer_io
from llmkit.core.interop.families import FAMILIES, family_of_model, shift_norms
from llmkit.core.interop.hf import base_state, write_checkpoint
from llmkit.core.model.transformer import rope_frequencies
from llmkit.core.store.checkpoint import build_model

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
BLOCK = {
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
}
TOP = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}
QK_NORMS = {"attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}
GEMMA_NORMS = {"post_attention_norm": "attn_post_norm", "ffn_norm": "mlp_norm", "post_ffw_norm": "mlp_post_norm"}
GPT2_BLOCK = {
    "attn_norm": "attn_norm",
    "attn_output": "attn.o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GPT2_TOP = {**TOP, "position_embd.weight": "pos_embed.weight", "output_norm.bias": "norm.bias"}


@dataclass(frozen=True)
class GgufArch:
    name: str
    family: str
    """The Hugging Face family (``families.FAMILIES``) whose options the model takes."""
    block: dict[str, str]
    """GGUF tensor in a block -> llmkit's module."""
    top: dict[str, str] = field(default_factory=lambda: TOP)
    permuted: bool = False
    """Query/key rows permuted by llama.cpp's converter (its Llama RoPE pairs neighbours)."""


GGUF_ARCHS = {
    a.name: a
    for a in (
        GgufArch("llama", "llama", BLOCK, permuted=True),
        GgufArch("qwen2", "qwen2", BLOCK),
        GgufArch("qwen3", "qwen3", {**BLOCK, **QK_NORMS}),
        GgufArch("gemma2", "gemma2", {**BLOCK, **GEMMA_NORMS}),
        GgufArch("gemma3", "gemma3_text", {**BLOCK, **GEMMA_NORMS, **QK_NORMS}),
        GgufArch("gpt2", "gpt2", GPT2_BLOCK, top=GPT2_TOP),
    )
}
ARCHS = tuple(GGUF_ARCHS)
GEMMA3_GLOBAL_EVERY = 6
"""llama.cpp's Gemma 3: every sixth layer global, windowed ones at RoPE base 10,000 (in its code,
not the file, unless a newer converter wrote the keys)."""
GEMMA3_LOCAL_THETA = 10000.0
LLMKIT_QUERY_SCALE = "llmkit.attention.query_pre_attn_scalar"
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
QUANTS = ("f32", "f16", "q8_0")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp's (each head's two halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k rows -> Hugging Face's (the inverse of ``_permute``)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_fields(reader) -> dict[str, Any]:
    """Every metadata key of a GGUF as a Python value (strings, numbers, lists)."""
    out: dict[str, Any] = {}
    for key, entry in reader.fields.items():
        try:
            out[key] = entry.contents()
        except Exception:  # an exotic type: llmkit reads none of those keys
            continue
    return out


# GGUF value types (gguf.GGUFValueType): the byte size of each scalar; 8 is a string, 9 an array.
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
HEADER_LIMITS = {"tensors": 1 << 20, "keys": 1 << 16, "string": 1 << 26, "dims": 8}
"""What a GGUF header may declare: a million tensors, 65,536 metadata keys, 64 MiB strings, 8
dimensions; every length is also checked against the bytes the file has left."""


def check_header(path: Path) -> None:
    """Walk a GGUF header (metadata and tensor table) without allocating anything it declares:
    every count and length must fit in the file's remaining bytes and under ``HEADER_LIMITS``.
    The ``gguf`` package builds Python lists from the declared counts: an 84-byte file declaring a
    2^40-element array would otherwise grow memory until the kernel stops the process."""

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise CheckpointError(f"{path} cannot be read as GGUF: {size} bytes is shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            _walk_header(m, size, path)


def _walk_header(m, size: int, path: Path) -> None:
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise CheckpointError(f"{path} cannot be read as GGUF: its header runs past the end of the file")
        (value,) = struct.unpack_from(fmt, m, pos)
        pos += n
        return value

    def skip(n: int, what: str) -> None:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise CheckpointError(f"{path}: {what} declares {n} bytes, more than the file holds: refused")
        pos += n

    def string(what: str) -> None:
        n = take("<Q")
        if n > HEADER_LIMITS["string"]:
            raise CheckpointError(f"{path}: {what} declares a string of {n} bytes: refused")
        skip(n, what)

    def value(kind: int, what: str) -> None:
        if kind in _SCALAR:
            skip(_SCALAR[kind], what)
        elif kind == _STRING:
            string(what)
        elif kind == _ARRAY:
            inner, count = take("<I"), take("<Q")
            least = _SCALAR.get(inner, 8)  # a string or an array takes at least its 8-byte length
            if count * least > size - pos:
                raise CheckpointError(f"{path}: {what} declares {count} elements, more than the file holds: refused")
            if inner in _SCALAR:
                skip(count * _SCALAR[inner], what)
            else:
                for _ in range(count):
                    value(inner, what)
        else:
            raise CheckpointError(f"{path}: {what} has an unknown value type {kind}: not a GGUF file llmkit reads")

    if m[:4] != b"GGUF":
        raise CheckpointError(f"{path} cannot be read as GGUF: it does not start with GGUF")
    pos = 4
    take("<I")  # version
    tensors, keys = take("<Q"), take("<Q")
    for what, n in (("tensors", tensors), ("keys", keys)):
        if n > HEADER_LIMITS[what]:
            raise CheckpointError(f"{path}: its header declares {n} {what}: refused")
    for i in range(keys):
        string(f"metadata key {i}")
        value(take("<I"), f"metadata key {i}")
    for i in range(tensors):
        string(f"tensor {i}'s name")
        dims = take("<I")
        if dims > HEADER_LIMITS["dims"]:
            raise CheckpointError(f"{path}: tensor {i} declares {dims} dimensions: refused")
        skip(8 * dims + 4 + 8, f"tensor {i}")  # its dimensions, type and offset


def open_reader(path: Path):
    import gguf  # optional dependency (the interop extra)

    check_header(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError):
        raise CheckpointError(
            f"{path} cannot be read as GGUF: it is truncated (a download cut short?) or not a GGUF file"
        ) from None


def config_from_gguf(f: dict[str, Any], where: str) -> dict[str, Any]:
    """llmkit's model section from a GGUF's metadata; a key of the wrong type or value (a string
    where a number belongs, zero heads) is one line naming it."""
    try:
        return _config_from_gguf(f, where)
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise CheckpointError(f"{where}: a metadata key has a wrong type or value ({e})") from None


def _config_from_gguf(f: dict[str, Any], where: str) -> dict[str, Any]:
    arch = f.get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{where}: architecture {arch!r} is not supported ({', '.join(ARCHS)} are)")

    def key(name: str, default: Any = None) -> Any:
        value = f.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{where}: no {arch}.{name} in its metadata")
        return value

    d_model, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    eps = f.get(f"{arch}.attention.layer_norm_rms_epsilon", f.get(f"{arch}.attention.layer_norm_epsilon"))
    section: dict[str, Any] = {
        **FAMILIES[GGUF_ARCHS[arch].family].options,
        "d_model": d_model,
        "n_layer": int(key("block_count")),
        "n_head": n_head,
        "n_kv_head": int(key("attention.head_count_kv", n_head)),
        "d_ff": int(key("feed_forward_length")),
        "context": int(key("context_length", 2048)),
        "norm_eps": float(eps if eps is not None else 1e-6),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "dropout": 0.0,
    }
    head = f.get(f"{arch}.attention.key_length")
    if head and int(head) != d_model // n_head:
        section["d_head"] = int(head)
    if arch in ("gemma2", "gemma3"):
        _gemma_from_gguf(f, arch, section)
    scaling = f.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        section.update(rope_scaling="linear", rope_factor=float(f[f"{arch}.rope.scaling.factor"]))
    elif scaling not in (None, "none"):
        raise CheckpointError(f"{where}: rope scaling {scaling!r} is not supported")
    return section


def _gemma_from_gguf(f: dict[str, Any], arch: str, section: dict[str, Any]) -> None:
    """What llama.cpp's Gemma code assumes: query scale 1/sqrt(head size) (27B: 1/sqrt(C/H)),
    the window's layer pattern and the local RoPE base (unless the file says otherwise)."""
    head = section.get("d_head") or section["d_model"] // section["n_head"]
    big = section["n_layer"] == 62  # Gemma 2/3 27B scale queries by the model width per head
    scale = f.get(LLMKIT_QUERY_SCALE) or (section["d_model"] // section["n_head"] if big else head)
    section["attn_scale"] = float(scale)
    section["norm_offset"] = 0.0  # the file holds 1 + w: kept as the scale itself
    window = f.get(f"{arch}.attention.sliding_window")
    if window:
        every = f.get(f"{arch}.attention.sliding_window_pattern") or (GEMMA3_GLOBAL_EVERY if arch == "gemma3" else 2)
        section.update(window=int(window), global_every=int(every))
        if arch == "gemma3":
            section["rope_local_theta"] = float(f.get(f"{arch}.rope.freq_base_swa") or GEMMA3_LOCAL_THETA)
    for key, ours in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "logit_softcap")):
        if f.get(f"{arch}.{key}"):
            section[ours] = float(f[f"{arch}.{key}"])


LLMKIT_ROPE = "llmkit.rope.llama3"
LLAMA3_ORIGINAL_CONTEXTS = tuple(2**k for k in range(4, 18))  # 16 … 131072 tokens


def rope_freq_table(c) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: how much each rotary frequency is divided by (llama3 scaling)."""

    plain = rope_frequencies(replace(c, rope_scaling=""))
    return (plain / rope_frequencies(c)).float()  # (D/2,)


def llama3_from_table(table: np.ndarray, section: dict[str, Any], fields: dict[str, Any], where: str) -> dict:
    """The llama3 scaling a ``rope_freqs`` table encodes: llmkit's own keys when it wrote the file,
    else the parameters of Meta's releases (low 1, high 4) with the original context that gives
    this very table; a table no such parameters give is refused, never ignored."""
    if fields.get(f"{LLMKIT_ROPE}.factor") is not None:
        candidates = [
            (
                float(fields[f"{LLMKIT_ROPE}.factor"]),
                float(fields[f"{LLMKIT_ROPE}.low_freq_factor"]),
                float(fields[f"{LLMKIT_ROPE}.high_freq_factor"]),
                int(fields[f"{LLMKIT_ROPE}.original_context"]),
            )
        ]
    else:
        candidates = [(float(table.max()), 1.0, 4.0, n) for n in LLAMA3_ORIGINAL_CONTEXTS]
    base = {k: v for k, v in section.items() if k in ModelConfig.__dataclass_fields__}
    for factor, low, high, original in candidates:
        keys = dict(
            rope_scaling="llama3",
            rope_factor=factor,
            rope_low_freq_factor=low,
            rope_high_freq_factor=high,
            rope_original_context=original,
        )
        cfg = ModelConfig(**{**base, **keys, "vocab_size": 8})
        if np.allclose(rope_freq_table(cfg).numpy(), table.reshape(-1), rtol=1e-5, atol=1e-6):
            return keys
    raise CheckpointError(f"{where}: its rope_freqs table is not a llama3 RoPE scaling llmkit can express")


def _tensor(t, where: str) -> np.ndarray:
    """One GGUF tensor as fp32, in PyTorch's shape (GGUF lists dimensions fastest first)."""
    from gguf import quants  # optional dependency (the interop extra)

    name = t.tensor_type.name
    if name not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{where}: tensor {t.name} is {name}, which llmkit does not read ({', '.join(SUPPORTED_TYPES)})"
        )
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    data = np.asarray(t.data)
    if name in ("F32", "F16"):
        values = data.astype(np.float32)
    else:
        values = quants.dequantize(data, t.tensor_type)
    return values.reshape(shape)


def import_to(src: Path, dest: Path, *, on_event: EventFn = events.ignore) -> Path:
    reader = open_reader(src)
    fields = read_fields(reader)
    section = config_from_gguf(fields, str(src))
    tokenizer = tokenizer_io.from_gguf(fields, str(src))
    section["vocab_size"] = int(fields.get(f"{fields['general.architecture']}.vocab_size") or tokenizer.vocab_size)
    arch = GGUF_ARCHS[fields["general.architecture"]]
    heads, kv = section["n_head"], section["n_kv_head"]
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            section.update(llama3_from_table(_tensor(t, str(src)), section, fields, str(src)))
            continue
        ours = arch.top.get(t.name)
        m = _GGUF_BLOCK.match(t.name)
        if ours is None and m and m.group(2) in arch.block:
            ours = f"blocks.{m.group(1)}.{arch.block[m.group(2)]}.{m.group(3)}"
        if ours is None and t.name.endswith("attn_rot_embd"):
            continue  # rotary tables some old converters stored: llmkit computes its own
        if m and arch.name == "gpt2" and m.group(2) == "attn_qkv":  # (3C, C) or (3C,): queries, keys, values
            w = torch.from_numpy(np.ascontiguousarray(_tensor(t, str(src))))
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), w.split(section["d_model"], dim=0)):
                tensors[f"blocks.{m.group(1)}.attn.{part}.{m.group(3)}"] = chunk.contiguous()
            continue
        if ours is None:
            raise CheckpointError(f"{src}: tensor {t.name} has no place in a {arch.name} model llmkit builds")
        w = _tensor(t, str(src))
        if arch.permuted and m and m.group(2) == "attn_q":
            w = _unpermute(w, heads)
        elif arch.permuted and m and m.group(2) == "attn_k":
            w = _unpermute(w, kv)
        tensors[ours] = torch.from_numpy(np.ascontiguousarray(w))
    section["tie_embeddings"] = "lm_head.weight" not in tensors
    on_event(events.Import(source=str(src), format="gguf", tensors=len(tensors)))
    state = base_state(
        src, "gguf", {"architecture": fields["general.architecture"], "gguf_file_type": fields.get("general.file_type")}
    )
    return write_checkpoint(dest, tensors, section, tokenizer, state)


# --- writing ----------------------------------------------------------------------------------------


def to_gguf_name(name: str, arch: GgufArch) -> str:
    for theirs, ours in arch.top.items():
        if name == ours:
            return theirs
    m = _OURS_BLOCK.match(name)
    inverse = {v: k for k, v in arch.block.items()}
    if not m or m.group(2) not in inverse:
        raise CheckpointError(f"no GGUF {arch.name} name for tensor {name!r}")
    return f"blk.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"


def gguf_arch_of(m: dict[str, Any]) -> GgufArch:
    """The GGUF architecture a model is written as: its Hugging Face family's (Mistral is llama)."""
    family = family_of_model(m).model_type
    return next(a for a in GGUF_ARCHS.values() if a.family == family)


def _gguf_tensors(state: dict[str, torch.Tensor], arch: GgufArch, c) -> dict[str, np.ndarray]:
    """llmkit's state as GGUF tensors: norms as their scale (1 + w for Gemma), Llama's query/key
    rows permuted, GPT-2's query/key/value fused."""
    state = shift_norms(state, c.norm_offset)
    out: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        m = _OURS_BLOCK.match(key)
        if arch.name == "gpt2" and m and m.group(2) in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            if m.group(2) == "attn.q_proj":  # written once, for the three
                parts = [
                    state[key.replace("q_proj", p)].detach().float().numpy() for p in ("q_proj", "k_proj", "v_proj")
                ]
                out[f"blk.{m.group(1)}.attn_qkv.{m.group(3)}"] = np.concatenate(parts, axis=0)  # (3C, C) or (3C,)
            continue
        data = tensor.detach().float().numpy()
        if arch.permuted and key.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
            data = _permute(data, c.n_head)
        elif arch.permuted and key.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
            data = _permute(data, c.kv_heads)
        out[to_gguf_name(key, arch)] = data
    return out


def export_file(ckpt, dest: Path, *, quant: str = "f16", name: str = "") -> Path:
    """A GGUF llama.cpp and Ollama run, as the architecture of the model's family (``gguf_arch_of``)."""
    import gguf  # optional dependency (the interop extra)

    if quant not in QUANTS:
        raise CheckpointError(f"--quant {quant!r}: choose {', '.join(QUANTS)}")
    if ckpt.kind == "classify":
        raise CheckpointError(
            f"{ckpt.path} is a classifier: llama.cpp runs language models; export the model it was fine-tuned from"
        )
    model = build_model(ckpt, "cpu", merge=True)
    c = model.cfg
    spec = gguf_arch_of(ckpt.config["model"])
    arch = spec.name
    state = model.state_dict()
    if c.tie_embeddings:
        state.pop("lm_head.weight", None)
    tensors = _gguf_tensors(state, spec, c)
    dest.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(dest), arch)
    w.add_name(name or ckpt.path.parent.name or "llmkit model")
    w.add_context_length(c.context)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.ff_dim)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.kv_heads)
    if c.norm == "layer":
        w.add_layer_norm_eps(c.norm_eps)
    else:
        w.add_layer_norm_rms_eps(c.norm_eps)
    if c.positions == "rope":
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
    _gemma_to_gguf(w, arch, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    if c.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_factor)
    if c.rope_scaling == "llama3":  # llama.cpp reads the scaling as a table of frequency divisors
        for key, value in (
            ("factor", c.rope_factor),
            ("low_freq_factor", c.rope_low_freq_factor),
            ("high_freq_factor", c.rope_high_freq_factor),
            ("original_context", c.rope_original_context),
        ):
            _add(w, f"{LLMKIT_ROPE}.{key}", value)  # the exact parameters, for llmkit reading it back
        w.add_tensor("rope_freqs.weight", rope_freq_table(c).numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[quant]
    )
    for key, value in tokenizer_io.gguf_metadata(ckpt.tokenizer).items():
        _add(w, key, value)
    for name, data in tensors.items():
        kind = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and quant != "f32":
            kind = gguf.GGMLQuantizationType.F16 if quant == "f16" else gguf.GGMLQuantizationType.Q8_0
            if quant == "q8_0" and data.shape[-1] % 32:
                kind = gguf.GGMLQuantizationType.F16  # Q8_0 packs rows by 32
        stored = (
            data.astype(np.float16)
            if kind == gguf.GGMLQuantizationType.F16
            else (
                gguf.quants.quantize(data, kind) if kind == gguf.GGMLQuantizationType.Q8_0 else data.astype(np.float32)
            )
        )
        w.add_tensor(name, stored, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def _gemma_to_gguf(w, arch: str, c) -> None:
    """The Gemma keys llama.cpp reads (and llmkit's own where llama.cpp assumes a value)."""
    if arch not in ("gemma2", "gemma3"):
        return
    _add(w, LLMKIT_QUERY_SCALE, float(c.attn_scale or c.head_dim))  # llama.cpp derives it from the sizes
    if c.window:
        _add(w, f"{arch}.attention.sliding_window", c.window)
        _add(w, f"{arch}.attention.sliding_window_pattern", c.global_every)
    if c.rope_local_theta:
        _add(w, f"{arch}.rope.freq_base_swa", float(c.rope_local_theta))
    for key, value in (("attn_logit_softcapping", c.attn_softcap), ("final_logit_softcapping", c.logit_softcap)):
        if value:
            _add(w, f"{arch}.{key}", float(value))


def _add(w, key: str, value: Any) -> None:
    """One metadata key with the type its value calls for."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:  # pragma: no cover - every key llmkit writes is one of the above
        raise TypeError(f"{key}: {type(value).__name__}")
