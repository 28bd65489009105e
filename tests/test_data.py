"""Corpus reading, the token cache and batches."""

import numpy as np
import pytest

from llmkit.core.config import DataConfig
from llmkit.core.errors import DataError
from llmkit.core.files.corpus import read_corpus, resolve_corpus
from llmkit.core.text.batches import batch_generator, train_batch
from llmkit.core.text.mix import Corpus, check_fits
from llmkit.core.text.token_cache import load_or_build


def test_split_follows_line_boundaries(tmp_path, tokenizer):
    text = "".join(f"ligne {i}\n" for i in range(100))
    f = tmp_path / "lignes.txt"
    f.write_text(text)
    data = load_or_build([f], tokenizer, DataConfig(cache_dir=str(tmp_path / "c")))
    train, val = tokenizer.decode(np.asarray(data.train[:-1])), tokenizer.decode(np.asarray(data.val[:-1]))
    assert train + val == text
    assert train.endswith("\n") and val.startswith("ligne")
    assert 0.05 < len(val) / len(text) < 0.15


def test_cache_is_reused_then_invalidated_by_an_edit(tmp_path, tokenizer, corpus_file):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    a = load_or_build([corpus_file], tokenizer, cfg)
    b = load_or_build([corpus_file], tokenizer, cfg)
    assert not a.from_cache and b.from_cache and a.path == b.path
    assert np.array_equal(np.asarray(a.train), np.asarray(b.train))
    corpus_file.write_text(corpus_file.read_text() + "\nUne phrase de plus.\n", encoding="utf-8")
    c = load_or_build([corpus_file], tokenizer, cfg)
    assert not c.from_cache and c.path != a.path


def test_token_stream_decodes_back_to_the_corpus(tmp_path, tokenizer, corpus_file):
    data = load_or_build([corpus_file], tokenizer, DataConfig(cache_dir=str(tmp_path)))
    text = corpus_file.read_text(encoding="utf-8")
    train_text = tokenizer.decode(np.asarray(data.train[:-1]))  # drop the final EOS
    val_text = tokenizer.decode(np.asarray(data.val[:-1]))
    assert train_text + val_text == text


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path, tokenizer, corpus_file):
    data = load_or_build([corpus_file], tokenizer, DataConfig(cache_dir=str(tmp_path)))
    x1, y1 = train_batch(data.train, 4, 16, batch_generator(7, 3))
    x2, _ = train_batch(data.train, 4, 16, batch_generator(7, 3))
    x3, _ = train_batch(data.train, 4, 16, batch_generator(7, 4))
    assert x1.equal(x2) and not x1.equal(x3)
    assert x1[:, 1:].equal(y1[:, :-1])


def test_corpus_too_small_for_one_block(tmp_path, tokenizer):
    f = tmp_path / "tiny.txt"
    f.write_text("Deux mots.\nEncore.\n")
    data = load_or_build([f], tokenizer, DataConfig(cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="corpus too small"):
        check_fits(Corpus([data], [1.0], [("corpus", data.val)], data.meta["val_bytes"]), 256)


def test_resolve_files_dirs_and_globs(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "b.md").write_text("b")
    (tmp_path / "d" / "MANIFEST.tsv").write_text("x\ty")
    (tmp_path / "c.txt").write_text("c")
    assert [p.name for p in resolve_corpus([str(tmp_path / "d")])] == ["a.txt", "b.md"]
    assert [p.name for p in resolve_corpus([str(tmp_path / "*.txt")])] == ["c.txt"]
    with pytest.raises(DataError, match="corpus not found"):
        resolve_corpus([str(tmp_path / "nope.txt")])


def test_binary_and_non_utf8_files_name_the_offset(tmp_path):
    b = tmp_path / "img.bin"
    b.write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match=r"img.bin: looks like a binary file \(NUL byte at byte offset 3\)"):
        read_corpus([b])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("été".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not valid UTF-8 at byte offset 0"):
        read_corpus([latin])


def test_empty_corpus(tmp_path):
    e = tmp_path / "empty.txt"
    e.write_text("  \n\n")
    with pytest.raises(DataError, match="corpus is empty"):
        read_corpus([e])
