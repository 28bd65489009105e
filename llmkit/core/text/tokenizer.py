"""Tokenizers: SentencePiece training with safe defaults; loading, encoding and the contract for
SentencePiece and Hugging Face ``tokenizers`` models alike (pretrained models bring either).

The contract (``tokenizer.yaml`` beside ``tokenizer.model``) records everything a checkpoint
depends on: vocab size, special ids, normalization, byte fallback, model type and hashes of the
model and of the corpus it was trained on. Two tokenizers are interchangeable only when their
contracts agree; :func:`check_compatible` says which field differs when they do not.

Defaults that avoid SentencePiece's traps:
- identity normalization, extra whitespace kept, no dummy prefix: text round-trips exactly,
  newlines and indentation included (``\\n`` and ``\\t`` are user symbols, always one token);
- byte fallback: an unseen character becomes its UTF-8 bytes, never <unk>;
- a real pad id (3), distinct from unk/bos/eos;
- ``input_sentence_size`` capped (sampled) so a large corpus cannot exhaust memory;
- a vocab too large for the corpus is reduced to SentencePiece's maximum, with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkit import __version__
from llmkit.core.atomic import atomic_write
from llmkit.core.config import TokenizerConfig
from llmkit.core.errors import DataError, TokenizerError, check_format
from llmkit.core.files.stream import sample_lines

FORMAT_VERSION = 1
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
WHITESPACE_SYMBOLS = ("\n", "\t")
METASPACE = "\u2581"  # SentencePiece's "▁": a space inside a piece
# Fields that must agree between a checkpoint's tokenizer and one handed to a command.
CONTRACT_FIELDS = (
    "vocab_size",
    "model_type",
    "special_ids",
    "user_symbols",
    "normalization",
    "byte_fallback",
    "add_dummy_prefix",
    "model_sha256",
)
# Every k-th non-blank line (k between 10 and 50, so a small corpus still holds out a few dozen
# lines) is kept out of training to measure the report on unseen text.
HELD_OUT_MAX = 2000


def _sp():
    import sentencepiece  # start-up time: loaded when a tokenizer is first used, not when the CLI starts

    return sentencepiece


class _SentencePiece:
    """The SentencePiece backend: llmkit's own tokenizers, and Llama 2 / Mistral / TinyLlama's."""

    file = "tokenizer.model"

    def __init__(self, model_bytes: bytes):
        self.sp = _sp().SentencePieceProcessor(model_proto=model_bytes)
        self.byte_ids = {i for i in range(self.sp.get_piece_size()) if self.sp.is_byte(i)}
        self.threads = os.cpu_count() or 1
        """Threads of a batch encode: all cores, or one in a worker process of its own."""
        self.literals: dict[str, int] = {}
        self.literal_re: re.Pattern | None = None

    def match_literals(self) -> None:
        """Find control pieces (``<start_of_turn>``) and pieces of raw spaces in the text before
        SentencePiece sees it, as llama.cpp and ``transformers`` do for a pretrained vocabulary
        (chat templates write control tokens as text; SentencePiece would spell them out, and it
        turns spaces into ▁ before a piece of raw spaces could match)."""
        sp = self.sp
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i) or " " in piece:
                self.literals.setdefault(piece, i)
        if self.literals:
            self.literal_re = re.compile(trie_pattern(list(self.literals)))

    def size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.literal_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        start = 0
        for m in self.literal_re.finditer(text):
            if m.start() > start:
                ids += self.sp.encode(text[start : m.start()])
            ids.append(self.literals[m.group()])
            start = m.end()
        if start < len(text):
            ids += self.sp.encode(text[start:])
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.literal_re is not None:
            return [self.encode(t) for t in texts]
        return self.sp.encode(texts, num_threads=self.threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def token_bytes(self) -> list[bytes | None]:
        sp, out = self.sp, []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                out.append(None)
            elif i in self.byte_ids:
                out.append(bytes([int(piece[3:5], 16)]))  # "<0xC3>"
            else:
                out.append(piece.replace(METASPACE, " ").encode("utf-8"))
        return out


def trie_pattern(words: list[str]) -> str:
    """A regular expression matching any of ``words``, longest first, written as a trie: the
    engine follows shared prefixes once instead of trying thousands of alternatives at each
    character (Gemma's vocabulary has 6,400 control pieces)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def walk(node: dict) -> str:
        branches = [re.escape(ch) + walk(child) for ch, child in sorted(node.items()) if ch]
        branches.sort(key=len, reverse=True)
        body = "|".join(branches)
        if "" in node:  # a word ends here: the longer ones are tried first, this one last
            return f"(?:{body})?" if body else ""
        return f"(?:{body})" if len(branches) > 1 else body

    return walk(trie)


class _HFTokenizers:
    """The Hugging Face ``tokenizers`` backend: byte-level BPE (Llama 3, Qwen, SmolLM, GPT-2) and
    anything else a ``tokenizer.json`` describes. Special tokens in text (``<|im_start|>``) are
    recognised as such, which chat templates rely on."""

    file = "tokenizer.json"

    def __init__(self, model_bytes: bytes):
        from tokenizers import Tokenizer as HFTokenizer  # optional dependency (the interop extra)

        self.tk = HFTokenizer.from_str(model_bytes.decode("utf-8"))
        self.byte_ids: set[int] = set()

    def size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(i) or ""

    def piece_to_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def token_bytes(self) -> list[bytes | None]:
        decoder = json.dumps(json.loads(self.tk.to_str()).get("decoder"))
        byte_level = '"ByteLevel"' in decoder  # GPT-2's scheme: each byte drawn as a printable character
        unbyte = {c: b for b, c in _bytes_to_unicode().items()}
        special = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        out: list[bytes | None] = []
        for i in range(self.size()):
            piece = self.tk.id_to_token(i)
            if piece is None or i in special:
                out.append(None)
            elif byte_level:
                out.append(bytes(unbyte[c] for c in piece) if all(c in unbyte for c in piece) else piece.encode())
            elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):  # a byte-fallback piece
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace(METASPACE, " ").encode("utf-8"))
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character (the printable ASCII and
    Latin-1 ones as themselves, the rest shifted past U+0100)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


BACKENDS = {"sentencepiece": _SentencePiece, "hf": _HFTokenizers}


class Tokenizer:
    """A loaded tokenizer (SentencePiece or Hugging Face ``tokenizers``) plus its contract.

    Every command sees the same interface whatever the backend: encode/decode, special ids, the
    contract that checkpoints check, and the model's chat template when it has one.
    """

    def __init__(self, model_bytes: bytes, contract: dict[str, Any]):
        self.model_bytes = model_bytes
        self.contract = contract
        self.backend_name = contract.get("backend", "sentencepiece")
        if self.backend_name not in BACKENDS:
            raise TokenizerError(
                f"tokenizer backend {self.backend_name!r} is not one llmkit reads ({', '.join(BACKENDS)})"
            )
        self.backend = BACKENDS[self.backend_name](model_bytes)
        if contract.get("special_in_text") and self.backend_name == "sentencepiece":
            self.backend.match_literals()
        self._byte_ids = self.backend.byte_ids
        self._token_bytes: list[bytes | None] | None = None

    @property
    def sp(self):
        """The SentencePiece processor (SentencePiece tokenizers only)."""
        return self.backend.sp

    @property
    def file(self) -> str:
        """The model file's name in a tokenizer or checkpoint directory."""
        return self.backend.file

    # --- loading and saving -----------------------------------------------------------------------
    @classmethod
    def find_in(cls, path: Path) -> Tokenizer | None:
        """The tokenizer of a tokenizer directory, a run's ``tokenizer/`` or a checkpoint, when one
        is there: read without torch (``tokenize encode`` answers in a fraction of a second)."""
        for where in (Path(path), Path(path) / "tokenizer"):
            if (where / "tokenizer.yaml").is_file():
                return cls.load(where)
        return None

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        directory = Path(directory)
        contract_path = directory / "tokenizer.yaml"
        if not contract_path.is_file():
            raise TokenizerError(f"{directory} has no tokenizer.yaml (is it a tokenizer or checkpoint directory?)")
        try:
            contract = yaml.safe_load(contract_path.read_text("utf-8"))
        except yaml.YAMLError as e:
            raise TokenizerError(f"{contract_path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(contract, dict) or "vocab_size" not in contract:
            raise TokenizerError(f"{contract_path}: not a tokenizer contract")
        check_format(contract.get("format", 1), FORMAT_VERSION, str(contract_path), contract.get("llmkit_version"))
        model_path = directory / BACKENDS.get(contract.get("backend", "sentencepiece"), _SentencePiece).file
        if not model_path.is_file():
            raise TokenizerError(f"{directory} has no {model_path.name} (is it a tokenizer or checkpoint directory?)")
        model_bytes = model_path.read_bytes()
        if hashlib.sha256(model_bytes).hexdigest() != contract.get("model_sha256"):
            raise TokenizerError(f"{model_path} does not match the model_sha256 in {contract_path.name}")
        try:
            return cls(model_bytes, contract)
        except TokenizerError:
            raise
        except Exception as e:  # each backend's own parse error (RuntimeError, ValueError, Exception)
            raise TokenizerError(f"{model_path}: not a tokenizer model llmkit can read ({e})") from None

    def save(self, directory: Path) -> None:
        """Write the model file then tokenizer.yaml (the contract last), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / self.file, self.model_bytes)
        text = yaml.safe_dump(self.contract, sort_keys=False, allow_unicode=True)
        atomic_write(directory / "tokenizer.yaml", text.encode("utf-8"))

    # --- encoding ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.size()

    def _special(self, name: str) -> int | None:
        value = (self.contract.get("special_ids") or SPECIAL_IDS).get(name)
        return None if value is None else int(value)

    @property
    def pad_id(self) -> int:
        pad = self._special("pad")
        return self.eos_id if pad is None else pad  # many pretrained models have none: EOS pads

    @property
    def bos_id(self) -> int:
        bos = self._special("bos")
        return self.eos_id if bos is None else bos

    @property
    def eos_id(self) -> int:
        return self._special("eos")

    @property
    def unk_id(self) -> int | None:
        return self._special("unk")

    @property
    def newline_id(self) -> int:
        piece = self.backend.piece_to_id("\n")
        return piece if piece is not None else self.encode("\n")[-1]

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (Jinja), when it came with one."""
        return self.contract.get("chat_template") or None

    def encode(self, text: str) -> list[int]:
        try:
            return self.backend.encode(text)
        except Exception:
            check_text(text)  # the usual cause: no text at all (a lone surrogate, bytes that were not UTF-8)
            raise

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return self.backend.encode_batch(texts)
        except Exception:
            for text in texts:
                check_text(text)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids])

    @property
    def expects_bos(self) -> bool:
        """Whether the model was trained with a BOS token before every text (Llama, Mistral)."""
        return bool(self.contract.get("add_bos"))

    def encode_text(self, text: str) -> list[int]:
        """A text as the model saw texts in training: its ids, after a BOS where the model expects
        one (what ``transformers``' tokenizers do by default). Never empty."""
        ids = self.encode(text) if text else []
        if not ids or (self.expects_bos and ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def pieces(self, text: str) -> list[str]:
        return [self.id_to_piece(i) for i in self.encode(text)]

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_piece(int(i))

    def token_text(self, i: int) -> str:
        """One token shown on its own: its text, or its piece (``<0xC3>``) when it is a byte of a
        longer UTF-8 sequence that means nothing alone."""
        text = self.decode([i])
        return self.id_to_piece(i) if not text or "\ufffd" in text else text

    def is_byte(self, i: int) -> bool:
        return i in self._byte_ids

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each token id stands for, in id order (None: a control or special token, which
        no text spells). What a grammar engine needs to know which tokens can continue a text."""
        if self._token_bytes is None:
            self._token_bytes = self.backend.token_bytes()
        return self._token_bytes


def check_text(text: str) -> None:
    """Refuse a string that is not text: a lone surrogate, which is what bytes that were not UTF-8
    become in a command-line argument or on standard input (Python's surrogateescape), or what a
    JSON escape like \\ud800 gives."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"the text is not valid UTF-8 (at character {e.start}: {text[e.start]!r}); give UTF-8 text"
        ) from None


def check_compatible(expected: dict[str, Any], given: dict[str, Any], *, what: str = "tokenizer") -> None:
    """Raise a TokenizerError naming the first contract field on which two tokenizers differ."""
    for key in CONTRACT_FIELDS:
        if expected.get(key) != given.get(key):
            raise TokenizerError(
                f"{what} does not match the checkpoint's: {key} is {given.get(key)!r}, "
                f"the checkpoint expects {expected.get(key)!r}"
            )


# --- training -------------------------------------------------------------------------------------


@dataclass
class TokenizerReport:
    vocab_size: int
    requested_vocab_size: int
    chars_per_token: float
    tokens_per_word: float
    byte_fallback_rate: float
    round_trip_exact: float
    held_out_lines: int
    training_lines: int
    warnings: list[str] = field(default_factory=list)
    corpus_lines: int = 0
    """Non-blank lines in the whole corpus (more than trained on when the corpus was sampled)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _lines(docs: list[str]) -> Iterator[str]:
    for doc in docs:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def cut_long_line(line: str, limit: int) -> list[str]:
    """A line as pieces of at most ``limit`` UTF-8 bytes, cut after a space where there is one.

    SentencePiece's trainer silently skips lines longer than its max_sentence_length; a corpus of
    long lines (one paragraph per line, a minified dump) would then train on nothing at all.
    """
    if len(line.encode("utf-8")) <= limit:
        return [line]
    pieces, start = [], 0
    while start < len(line):
        end = min(len(line), start + limit)  # characters: at most ``limit`` bytes only for ASCII
        while len(line[start:end].encode("utf-8")) > limit:
            end = start + max(1, (end - start) * 3 // 4)
        if end < len(line):
            space = line.rfind(" ", start + 1, end)
            end = space + 1 if space > start else end
        pieces.append(line[start:end])
        start = end
    return pieces


def _split_held_out(sample: Iterable[str], limit: int = 0) -> tuple[list[str], list[str], int]:
    """(training lines, held-out lines, how many long lines were cut for the trainer)."""
    lines, cut = [], 0
    for line in sample:
        pieces = cut_long_line(line, limit) if limit else [line]
        cut += len(pieces) > 1
        lines.extend(pieces)
    every = min(max(len(lines) // 100, 10), 50)
    train, held = [], []
    for i, line in enumerate(lines):
        if i % every == every - 1 and len(held) < HELD_OUT_MAX:
            held.append(line)
        else:
            train.append(line)
    if not train:
        train, held = held, []
    return train, held, cut


def _train_proto(lines: list[str], cfg: TokenizerConfig, vocab_size: int) -> bytes:
    model = io.BytesIO()
    user_symbols = list(dict.fromkeys([*WHITESPACE_SYMBOLS, *cfg.user_symbols]))
    _sp().SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=user_symbols,
        unk_id=SPECIAL_IDS["unk"],
        bos_id=SPECIAL_IDS["bos"],
        eos_id=SPECIAL_IDS["eos"],
        pad_id=SPECIAL_IDS["pad"],
        input_sentence_size=cfg.max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=cfg.max_sentence_length,
        num_threads=cfg.threads or (os.cpu_count() or 1),
        hard_vocab_limit=cfg.model_type != "char",
        minloglevel=2,
    )
    return model.getvalue()


def train_tokenizer(docs: list[str], cfg: TokenizerConfig, *, corpus_sha256: str) -> tuple[Tokenizer, TokenizerReport]:
    """Train a SentencePiece model on documents held in memory; return it with a quality report."""
    return train_tokenizer_on_lines(_lines(docs), cfg, corpus_sha256=corpus_sha256)


def train_tokenizer_on_lines(
    sample: Iterable[str], cfg: TokenizerConfig, *, corpus_sha256: str, corpus_lines: int = 0
) -> tuple[Tokenizer, TokenizerReport]:
    """Train a SentencePiece model on non-blank lines (a corpus's, or a sample of them:
    ``corpus_lines`` then says how many the whole corpus has, for the report)."""
    train_lines, held_out, cut = _split_held_out(sample, cfg.max_sentence_length)
    if not train_lines:
        raise TokenizerError("corpus has no non-blank lines to train a tokenizer on")
    warnings: list[str] = []
    if cut:
        warnings.append(
            f"{cut} line(s) longer than tokenizer.max_sentence_length ({cfg.max_sentence_length} bytes) "
            "were cut into pieces for tokenizer training (SentencePiece skips longer lines; "
            "encoding is not affected)"
        )
    vocab_size = cfg.vocab_size
    for _attempt in range(3):
        try:
            proto = _train_proto(train_lines, cfg, vocab_size)
            break
        except RuntimeError as e:
            msg = str(e)
            m = re.search(r"value <= (\d+)", msg)
            if m and int(m.group(1)) < vocab_size:
                new = int(m.group(1))
                warnings.append(f"vocab_size {vocab_size} is too large for this corpus; reduced to {new}")
                vocab_size = new
                continue
            small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
            if small:
                raise TokenizerError(
                    f"vocab_size {small.group(1)} is too small for this corpus: it needs at least {small.group(2)} "
                    "(its characters, 256 byte pieces and the special tokens); raise --vocab-size or lower "
                    "--character-coverage"
                ) from None
            raise TokenizerError(f"SentencePiece could not train: {msg.strip().splitlines()[-1]}") from None
    else:  # pragma: no cover - SentencePiece converges on its own maximum at the first retry
        raise TokenizerError("SentencePiece could not settle on a vocabulary size")

    contract = {
        "format": FORMAT_VERSION,
        "llmkit_version": __version__,
        "vocab_size": 0,  # filled below from the trained model
        "model_type": cfg.model_type,
        "special_ids": dict(SPECIAL_IDS),
        "user_symbols": list(dict.fromkeys([*WHITESPACE_SYMBOLS, *cfg.user_symbols])),
        "normalization": "identity",
        "byte_fallback": cfg.byte_fallback,
        "add_dummy_prefix": False,
        "character_coverage": cfg.character_coverage,
        "corpus_sha256": corpus_sha256,
        "model_sha256": hashlib.sha256(proto).hexdigest(),
    }
    tok = Tokenizer(proto, contract)
    contract["vocab_size"] = tok.vocab_size
    report = _report(
        tok, held_out or train_lines[:HELD_OUT_MAX], cfg.vocab_size, len(train_lines), bool(held_out), warnings
    )
    report.corpus_lines = corpus_lines or report.training_lines + report.held_out_lines
    return tok, report


def _report(
    tok: Tokenizer, lines: list[str], requested: int, n_train: int, held: bool, warnings: list[str]
) -> TokenizerReport:
    encoded = tok.encode_batch(lines)
    n_tokens = sum(len(ids) for ids in encoded) or 1
    n_chars = sum(len(line) for line in lines)
    n_words = sum(len(line.split()) for line in lines) or 1
    n_bytes = sum(1 for ids in encoded for i in ids if tok.is_byte(i))
    exact = sum(tok.decode(ids) == line for ids, line in zip(encoded, lines))
    if not held:
        warnings.append("corpus too small to hold lines out: round trip measured on training lines")
    return TokenizerReport(
        vocab_size=tok.vocab_size,
        requested_vocab_size=requested,
        chars_per_token=n_chars / n_tokens,
        tokens_per_word=n_tokens / n_words,
        byte_fallback_rate=n_bytes / n_tokens,
        round_trip_exact=exact / max(len(lines), 1),
        held_out_lines=len(lines) if held else 0,
        training_lines=n_train,
        warnings=warnings,
    )


def train_on_files(
    files, cfg: TokenizerConfig, *, text_field: str = "text", seed: int = 0
) -> tuple[Tokenizer, TokenizerReport]:
    """Train on a seeded, bounded sample of the lines of corpus files (``CorpusFile`` list), read as
    streams: a corpus of any size trains in the memory of ``tokenizer.sample_mb``."""
    sample = sample_lines(files, cfg.max_sentences, cfg.sample_mb << 20, seed, text_field)
    if not sample.lines:
        raise TokenizerError("corpus has no non-blank lines to train a tokenizer on")
    return train_tokenizer_on_lines(sample.lines, cfg, corpus_sha256=sample.sha256, corpus_lines=sample.seen)
