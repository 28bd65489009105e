"""The tokenizers of pretrained models as llmkit tokenizers, and llmkit's written back.

In: a folder's ``tokenizer.json`` (any Hugging Face fast tokenizer) or ``tokenizer.model``
(SentencePiece: Llama 2, Mistral, TinyLlama), with special tokens and the chat template from
``tokenizer_config.json``; or the vocabulary inside a GGUF (``tokenizer.ggml.*``): byte-level BPE
vocabularies and merges made into a ``tokenizers`` model with the pre-tokenizer llama.cpp applies
for that model family, SentencePiece ('llama') pieces and scores written back as the
SentencePiece model they came from.

Out: ``tokenizer.json`` + ``tokenizer_config.json`` for ``transformers``' AutoTokenizer (llmkit's
own SentencePiece models converted: vocabulary, merges in score order, byte fallback, ``\\n`` and
``\\t`` kept whole), and ``tokenizer.ggml.*`` metadata for a GGUF.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from llmkit import __version__
from llmkit.core.errors import CheckpointError
from llmkit.core.interop.folder import member
from llmkit.core.text.tokenizer import FORMAT_VERSION, Tokenizer

# The pre-tokenizer split of llama.cpp's byte-level BPE families (the regexes its converter and
# transformers use), by the GGUF's ``tokenizer.ggml.pre``.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {
    "llama-bpe": LLAMA3_SPLIT,
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
}
DIGITS_THEN_GPT2 = ("smollm",)  # each digit alone, then GPT-2's byte-level split
GPT2 = ("default", "gpt2", "gpt-2", None)
LLMKIT_SP_KEY = "llmkit.tokenizer.sentencepiece"  # base64 of tokenizer.model, in GGUFs llmkit writes
LLMKIT_CONTRACT_KEY = "llmkit.tokenizer.contract"


def contract(
    model_bytes: bytes,
    *,
    backend: str,
    vocab_size: int,
    special: dict[str, int | None],
    chat_template: str | None = None,
    add_bos: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "llmkit_version": __version__,
        "backend": backend,
        "vocab_size": vocab_size,
        "special_ids": special,
        "chat_template": chat_template or "",
        "add_bos": add_bos,
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        **extra,
    }


def _token_id(tk, token: Any) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        token = token.get("content")
    return tk.token_to_id(token) if isinstance(token, str) else None


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    path = member(folder, "chat_template.jinja")
    if path is not None:
        return path.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def from_hf_folder(folder: Path, hf_cfg: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder (tokenizer.json preferred, as AutoTokenizer)."""
    tok_cfg: dict[str, Any] = {}
    config_file = member(folder, "tokenizer_config.json")
    if config_file is not None:
        try:
            tok_cfg = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{folder}/tokenizer_config.json is not valid JSON: {e}") from None
    template = _chat_template(folder, tok_cfg)
    tokenizer_file = member(folder, "tokenizer.json")
    if tokenizer_file is not None:
        from tokenizers import Tokenizer as HFTokenizer  # optional dependency (the interop extra)

        raw = tokenizer_file.read_bytes()
        try:
            tk = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise CheckpointError(f"{folder}/tokenizer.json cannot be read: {e}") from None
        special = {name: _token_id(tk, tok_cfg.get(f"{name}_token")) for name in ("bos", "eos", "pad", "unk")}
        for name in ("bos", "eos", "pad"):
            if special[name] is None and hf_cfg.get(f"{name}_token_id") is not None:
                value = hf_cfg[f"{name}_token_id"]
                special[name] = int(value[0] if isinstance(value, list) else value)
        if special["eos"] is None:
            raise CheckpointError(
                f"{folder}: no end-of-text token (eos_token in tokenizer_config.json, eos_token_id in config.json)"
            )
        add_bos = bool(tok_cfg.get("add_bos_token", False))
        return Tokenizer(
            raw,
            contract(
                raw,
                backend="hf",
                vocab_size=tk.get_vocab_size(with_added_tokens=True),
                special=special,
                chat_template=template,
                add_bos=add_bos,
                gguf_pre=_guess_pre(json.loads(raw)),
            ),
        )
    sp_file = member(folder, "tokenizer.model")
    if sp_file is not None:
        raw = sp_file.read_bytes()
        try:
            import sentencepiece  # start-up time: loaded when a tokenizer is first used, not when the CLI starts

            sp = sentencepiece.SentencePieceProcessor(model_proto=raw)
        except Exception as e:
            raise CheckpointError(f"{folder}/tokenizer.model is not a SentencePiece model: {e}") from None
        ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
        special = {k: (v if v >= 0 else None) for k, v in ids.items()}
        return Tokenizer(
            raw,
            contract(
                raw,
                backend="sentencepiece",
                vocab_size=sp.get_piece_size(),
                special=special,
                chat_template=template,
                add_bos=bool(tok_cfg.get("add_bos_token", True)),
                model_type="pretrained",
            ),
        )
    raise CheckpointError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")


def _guess_pre(spec: dict[str, Any]) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer, for writing it to a GGUF."""
    text = json.dumps(spec.get("pre_tokenizer"))
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "Split" in text and r"\\p{N}|" in text:
        return "qwen2"
    return "default"


# --- GGUF -------------------------------------------------------------------------------------------


def from_gguf(fields: dict[str, Any], where: str) -> Tokenizer:
    """The tokenizer of a GGUF's ``tokenizer.ggml.*`` metadata (byte-level BPE or SentencePiece)."""
    from tokenizers import (  # optional dependency (the interop extra)
        AddedToken,
        Regex,
        decoders,
        models,
        pre_tokenizers,
    )
    from tokenizers import Tokenizer as HFTokenizer  # optional dependency (the interop extra)

    kind = fields.get("tokenizer.ggml.model")
    if fields.get(LLMKIT_SP_KEY):  # written by llmkit: its own SentencePiece model, exactly
        raw = base64.b64decode(fields[LLMKIT_SP_KEY])
        return Tokenizer(
            raw, {**json.loads(fields[LLMKIT_CONTRACT_KEY]), "model_sha256": hashlib.sha256(raw).hexdigest()}
        )
    if kind == "llama":
        return _sentencepiece_from_gguf(fields, where)
    if kind != "gpt2":
        raise CheckpointError(
            f"{where}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE 'gpt2' "
            "and SentencePiece 'llama' are); import the model's Hugging Face folder instead"
        )
    pre = fields.get("tokenizer.ggml.pre")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre in SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in GPT2:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise CheckpointError(
            f"{where}: pre-tokenizer {pre!r} is not supported (smollm, llama-bpe, qwen2 and gpt2 are)"
        )
    tk.decoder = decoders.ByteLevel()
    # Control and user-defined tokens (<|im_start|>, <|endoftext|>) are matched whole in text.
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    tk.add_special_tokens(specials)
    raw = tk.to_str().encode("utf-8")

    def special(key: str) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    ids = {
        "bos": special("bos_token_id"),
        "eos": special("eos_token_id"),
        "pad": special("padding_token_id"),
        "unk": special("unknown_token_id"),
    }
    return Tokenizer(
        raw,
        contract(
            raw,
            backend="hf",
            vocab_size=len(tokens),
            special=ids,
            chat_template=fields.get("tokenizer.chat_template"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            gguf_pre=pre or "default",
        ),
    )


# --- a SentencePiece model rebuilt from a GGUF vocabulary ---------------------------------------------
# A GGUF of Llama 2, Mistral or TinyLlama carries the pieces, scores and types of the model's
# tokenizer.model, not the file. Those are all a BPE SentencePiece model holds (merges follow the
# scores), so the ModelProto is written back field by field (sentencepiece_model.proto's numbers)
# and SentencePiece itself encodes: ids equal the original model's.


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 64-bit two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


GGUF_TYPES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}  # normal, unknown, control, user-defined, unused, byte


def sentencepiece_proto(
    tokens: list[str], scores: list[float], types: list[int], *, special: dict[str, int | None], add_dummy_prefix: bool
) -> bytes:
    """The bytes of a BPE SentencePiece ModelProto with these pieces (llama.cpp's 'llama' vocabulary)."""
    out = bytearray()
    for piece, score, kind in zip(tokens, scores, types):
        out += _pb_bytes(
            1,
            _pb_bytes(1, piece.encode("utf-8")) + _pb_float(2, float(score)) + _pb_int(3, GGUF_TYPES.get(int(kind), 1)),
        )
    trainer = (
        _pb_int(3, 2)
        + _pb_int(4, len(tokens))
        + _pb_int(35, int(6 in types))
        + b"".join(
            _pb_int(f, -1 if special.get(k) is None else special[k])
            for f, k in ((40, "unk"), (41, "bos"), (42, "eos"), (43, "pad"))
        )
    )
    normalizer = _pb_bytes(1, b"identity") + _pb_int(3, int(add_dummy_prefix)) + _pb_int(4, 0) + _pb_int(5, 1)
    out += _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)
    return bytes(out)


def _sentencepiece_from_gguf(fields: dict[str, Any], where: str) -> Tokenizer:
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    def special(key: str) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}")
        return None if value is None or int(value) < 0 or int(value) >= len(tokens) else int(value)

    ids = {
        "unk": special("unknown_token_id"),
        "bos": special("bos_token_id"),
        "eos": special("eos_token_id"),
        "pad": special("padding_token_id"),
    }
    if ids["unk"] is None and 2 in types:
        ids["unk"] = types.index(2)
    if ids["pad"] is not None and ids["pad"] in (ids["unk"], ids["bos"], ids["eos"]):
        ids["pad"] = None  # SentencePiece wants distinct ids; the contract then pads with EOS
    raw = sentencepiece_proto(
        tokens, scores, types, special=ids, add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    )
    try:
        tok = Tokenizer(
            raw,
            contract(
                raw,
                backend="sentencepiece",
                vocab_size=len(tokens),
                special=ids,
                chat_template=fields.get("tokenizer.chat_template"),
                add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", True)),
                model_type="pretrained",
                special_in_text=True,  # as llama.cpp reads such a vocabulary: control pieces in text are tokens
            ),
        )
    except Exception as e:  # SentencePiece's own check of the rebuilt model
        raise CheckpointError(f"{where}: its SentencePiece vocabulary cannot be rebuilt ({e})") from None
    return tok


def gguf_metadata(tok: Tokenizer) -> dict[str, Any]:
    """``tokenizer.ggml.*`` for a GGUF: byte-level BPE (gpt2) or SentencePiece (llama) vocabularies."""
    n = tok.vocab_size
    specials = {v for v in (tok.contract.get("special_ids") or {}).values() if v is not None}
    meta: dict[str, Any] = {
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id,
    }
    if tok.unk_id is not None:
        meta["tokenizer.ggml.unknown_token_id"] = tok.unk_id
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    if tok.backend_name == "hf":
        spec = json.loads(tok.model_bytes)
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise CheckpointError(f"a {model.get('type')} tokenizer cannot be written to a GGUF (BPE only)")
        added = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
        tokens = [tok.id_to_piece(i) for i in range(n)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        meta.update(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": tok.contract.get("gguf_pre", "default"),
                "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.merges": merges,
                "tokenizer.ggml.token_type": [3 if i in added or i in specials else 1 for i in range(n)],
                "tokenizer.ggml.add_bos_token": bool(tok.contract.get("add_bos")),
            }
        )
        return meta
    sp = tok.sp
    # llama.cpp reads the vocabulary below; llmkit reads back its exact model from these two keys.
    meta[LLMKIT_SP_KEY] = base64.b64encode(tok.model_bytes).decode("ascii")
    meta[LLMKIT_CONTRACT_KEY] = json.dumps(tok.contract, ensure_ascii=False)
    types = []
    for i in range(n):
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.id_to_piece(i) in ("\n", "\t"):
            types.append(4)
        else:
            types.append(1)
    meta.update(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_space_prefix": False,
        }
    )
    return meta


# --- writing Hugging Face tokenizer files ------------------------------------------------------------


def sentencepiece_to_json(tok: Tokenizer) -> str:
    """An llmkit SentencePiece tokenizer as a ``tokenizer.json`` that encodes to the same ids:
    spaces become ▁ (SentencePiece's own escape, no dummy prefix), ``\\n``/``\\t`` and the special
    tokens are matched whole, BPE merges follow piece scores, unknown bytes fall back to <0xNN>."""
    from tokenizers import AddedToken, decoders, models, normalizers  # optional dependency (the interop extra)
    from tokenizers import Tokenizer as HFTokenizer  # optional dependency (the interop extra)

    sp = tok.sp
    n = sp.get_piece_size()
    kind = tok.contract.get("model_type", "bpe")
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    if kind == "bpe":
        pieces = [
            (sp.id_to_piece(i), i) for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
        ]
        merges = []
        for piece, rank in pieces:  # every way to make a piece from two pieces, in the piece's rank
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((vocab[left], vocab[right], rank, left, right))
        merges.sort(key=lambda m: (m[2], m[0], m[1]))
        model = models.BPE(
            vocab=vocab,
            merges=[(m[3], m[4]) for m in merges],
            unk_token=sp.id_to_piece(sp.unk_id()),
            byte_fallback=True,
            fuse_unk=True,
        )
    elif kind == "unigram":
        model = models.Unigram(
            [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(n)], unk_id=sp.unk_id(), byte_fallback=True
        )
    else:
        raise CheckpointError(
            f"a {kind} SentencePiece tokenizer cannot be written as tokenizer.json (bpe and unigram can)"
        )
    tk = HFTokenizer(model)
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user = [p for p in tok.contract.get("user_symbols", []) if p in vocab]
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tk.to_str()


def write_hf_tokenizer(tok: Tokenizer, dest: Path, *, context: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in ``dest``."""
    raw = tok.model_bytes.decode("utf-8") if tok.backend_name == "hf" else sentencepiece_to_json(tok)
    (dest / "tokenizer.json").write_text(raw, encoding="utf-8")

    def name(i: int | None) -> str | None:
        return None if i is None else tok.id_to_piece(i)

    special = {
        "bos_token": name(tok.bos_id),
        "eos_token": name(tok.eos_id),
        "pad_token": name(tok.pad_id),
        "unk_token": name(tok.unk_id),
    }
    special = {k: v for k, v in special.items() if v is not None}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(tok.contract.get("add_bos")),
        "add_eos_token": False,
        **special,
    }
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
