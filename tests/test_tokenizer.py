"""The tokenizer: round trips, the contract, training safeguards."""

import pytest

from llmkit.core.config import TokenizerConfig
from llmkit.core.errors import TokenizerError
from llmkit.core.text.tokenizer import Tokenizer, check_compatible, train_tokenizer


def test_round_trip_keeps_newlines_indentation_and_rare_characters(tokenizer):
    text = "def f(x):\n    return x\n\n\tindenté  deux espaces\n« guillemets » — 東京 🚀\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.newline_id in tokenizer.encode("a\nb")


def test_special_ids_are_distinct_and_pad_is_real(tokenizer):
    ids = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, 0}
    assert len(ids) == 4
    assert tokenizer.id_to_piece(tokenizer.pad_id) == "<pad>"


def test_too_large_vocab_is_reduced_with_a_warning():
    docs = ["le chat dort.\nle chien court.\n" * 20]
    tok, report = train_tokenizer(docs, TokenizerConfig(vocab_size=50_000), corpus_sha256="x")
    assert tok.vocab_size < 50_000
    assert any("reduced" in w for w in report.warnings)


def test_char_model_and_report(sample_docs):
    tok, report = train_tokenizer(sample_docs, TokenizerConfig(model_type="char", vocab_size=400), corpus_sha256="x")
    assert report.round_trip_exact == 1.0
    assert 0.9 < report.chars_per_token <= 1.0
    assert report.held_out_lines > 0


def test_save_load_and_contract_mismatch_names_field(tokenizer, tmp_path, sample_docs):
    tokenizer.save(tmp_path / "a")
    loaded = Tokenizer.load(tmp_path / "a")
    assert loaded.encode("Bonjour") == tokenizer.encode("Bonjour")
    other, _ = train_tokenizer(sample_docs, TokenizerConfig(vocab_size=380), corpus_sha256="y")
    with pytest.raises(TokenizerError, match="vocab_size is 380"):
        check_compatible(tokenizer.contract, other.contract)


def test_tampered_model_file_is_refused(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="does not match"):
        Tokenizer.load(tmp_path)


def test_too_small_vocab_is_one_clear_error(sample_docs):
    with pytest.raises(TokenizerError, match=r"vocab_size 100 is too small for this corpus: it needs at least \d+"):
        train_tokenizer(sample_docs, TokenizerConfig(vocab_size=100), corpus_sha256="x")


def test_trie_pattern_finds_the_longest_literal_first():
    """Pretrained SentencePiece vocabularies (Gemma's) find control pieces and pieces of raw spaces
    in the text first, longest first, as llama.cpp and transformers do."""
    import re

    from llmkit.core.text.tokenizer import trie_pattern

    words = ["<eos>", "<end_of_turn>", "<end>", "  ", "   ", "    ", "<unused1>", "<unused12>"]
    rx = re.compile(trie_pattern(words))
    text = "a<end_of_turn>b<end>   c<unused12><unused1>  d <eos> <e"
    assert [m.group() for m in rx.finditer(text)] == [
        "<end_of_turn>",
        "<end>",
        "   ",
        "<unused12>",
        "<unused1>",
        "  ",
        "<eos>",
    ]
