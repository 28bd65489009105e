"""The corpus path built for size: streamed, sharded, parallel, resumable token caches; formats
and compression; sources mixed by weight; an explicit validation set; exact deduplication; the
bounded tokenizer sample; and every bad input in one line."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import need_module

from llmkit.core.config import DataConfig, TokenizerConfig
from llmkit.core.errors import ConfigError, DataError
from llmkit.core.files import stream
from llmkit.core.files.corpus import decode_text, resolve_files
from llmkit.core.text.batches import batch_generator
from llmkit.core.text.mix import check_fits, load_corpus, mixed_starts, parse_mix, plan_sources
from llmkit.core.text.token_cache import Source, encode_text, load_or_build, load_source


def single_pass(paths: list[Path], tok, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every file read whole, split at the byte mark (the first line break at or
    after it, else the first space), encoded at once. The streamed build must equal it."""
    train, val = [], []
    for p in paths:
        raw = p.read_bytes()
        if not decode_text(raw, p).strip():
            continue
        mark = int(len(raw) * (1 - val_fraction))
        cut = next((i + 1 for i in (raw.find(b"\n", mark), raw.find(b" ", mark)) if i >= 0), len(raw))
        head, tail = decode_text(raw[:cut], p), decode_text(raw[cut:], p, first=False)
        train += encode_text(tok, head) + [tok.eos_id]
        if tail:
            val += encode_text(tok, tail) + [tok.eos_id]
    return np.asarray(train), np.asarray(val)


def _corpus(tmp_path: Path, sample_docs: list[str], copies: int = 3) -> list[Path]:
    """A few files with accents, CRLF line ends, a BOM and a long line: everything chunking must
    not change."""
    paths = []
    for i in range(copies):
        text = f"Document {i}.\n" + "\n".join(sample_docs)[i * 97 :] + "\n" + ("é" * 3000) + " fin\n"
        data = text.encode("utf-8")
        if i == 1:
            data = b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")
        p = tmp_path / f"doc{i}.txt"
        p.write_bytes(data)
        paths.append(p)
    return paths


@pytest.fixture
def small_chunks(monkeypatch):
    """Pieces of a few KB, so a corpus of a few hundred KB is many pieces and many shards."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 4096)


def _cfg(tmp_path: Path, name: str = "cache", **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / name), shard_tokens=kw.pop("shard_tokens", 1024), **kw)


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.bin"))}


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_sharded_cache_equals_the_single_pass_result(tmp_path, tokenizer, sample_docs, small_chunks, workers):
    paths = _corpus(tmp_path, sample_docs)
    data = load_or_build(paths, tokenizer, _cfg(tmp_path, workers=workers))
    train, val = single_pass(paths, tokenizer)
    assert np.array_equal(np.asarray(data.train), train)  # token for token
    assert np.array_equal(np.asarray(data.val), val)
    assert len(data.meta["shards"]["train"]) > 3 and set(data.meta["shards"]["train"][:-1]) == {1024}
    assert data.meta["documents"] == 3 and data.meta["val_tokens"] == val.size
    # a window across a shard boundary reads as the flat stream does
    assert np.array_equal(data.train[1000:1100], train[1000:1100])


def test_worker_count_and_chunk_size_do_not_change_the_cache(tmp_path, tokenizer, sample_docs, monkeypatch):
    paths = _corpus(tmp_path, sample_docs)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 4096)
    one = load_or_build(paths, tokenizer, _cfg(tmp_path, "a", workers=1))
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1500)
    two = load_or_build(paths, tokenizer, _cfg(tmp_path, "b", workers=2))
    assert _shard_bytes(one.path) == _shard_bytes(two.path)
    assert one.path.name == two.path.name  # the key is the content's, not the build's


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from llmkit.core.files import stream
    from llmkit.core.text.token_cache import load_or_build
    from llmkit.core.config import DataConfig
    from llmkit.core.text.tokenizer import Tokenizer
    stream.CHUNK_BYTES = 4096
    tok = Tokenizer.load(Path(sys.argv[1]))
    paths = [Path(p) for p in sys.argv[3:]]
    def progress(p):
        if p.done >= 0.7 * p.total:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind: a real crash
    load_or_build(paths, tok, DataConfig(cache_dir=sys.argv[2], shard_tokens=1024, workers=int(os.environ["W"])),
                  on_progress=progress)
""")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_build_killed_at_70_percent_resumes_byte_identical(tmp_path, tokenizer, sample_docs, small_chunks, workers):
    paths = _corpus(tmp_path, sample_docs)
    tokenizer.save(tmp_path / "tok")
    cache = tmp_path / "killed"
    env = {**os.environ, "W": str(workers)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path / "tok"), str(cache), *map(str, paths)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr
    builds = list((cache / "tokens").glob("build-*"))
    assert len(builds) == 1 and (builds[0] / "state.json").is_file()
    state = json.loads((builds[0] / "state.json").read_text())
    assert state["train"]["shards"] >= 2  # finished shards were kept
    seen = []
    resumed = load_or_build(paths, tokenizer, _cfg(tmp_path, "killed"), on_progress=lambda p: seen.append(p.done))
    assert seen[0] >= 0.6 * seen[-1]  # it went on from where it was, not from the start
    clean = load_or_build(paths, tokenizer, _cfg(tmp_path, "clean"))
    assert _shard_bytes(resumed.path) == _shard_bytes(clean.path)
    assert resumed.meta == {**clean.meta}
    assert not list((cache / "tokens").glob("build-*"))


def test_the_fast_path_trusts_size_and_time_and_can_be_turned_off(tmp_path, tokenizer, sample_docs, monkeypatch):
    paths = _corpus(tmp_path, sample_docs, copies=1)
    first = load_or_build(paths, tokenizer, _cfg(tmp_path))
    opened = []
    real = stream.open_raw
    monkeypatch.setattr("llmkit.core.text.token_cache.open_raw", lambda p: opened.append(p) or real(p))
    monkeypatch.setattr("llmkit.core.files.stream.open_raw", lambda p: opened.append(p) or real(p))
    again = load_or_build(paths, tokenizer, _cfg(tmp_path))
    assert again.from_cache and not opened  # unchanged size and time: not even read
    # same size and time, other bytes: trusted by default (documented), caught when turned off
    st = paths[0].stat()
    data = bytearray(paths[0].read_bytes())
    data[0:8] = b"DOCUMENT"
    paths[0].write_bytes(bytes(data))
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_or_build(paths, tokenizer, _cfg(tmp_path)).path == first.path
    checked = load_or_build(paths, tokenizer, _cfg(tmp_path, trust_mtime=False))
    assert checked.path != first.path and not checked.from_cache
    assert opened  # it read the file to hash it


def _write(path: Path, text: str, compression: str | None) -> Path:
    data = text.encode("utf-8")
    if compression == "gzip":
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    elif compression == "zstd":
        zstd = need_module("zstandard", "reading .zst corpora")
        path = path.with_name(path.name + ".zst")
        path.write_bytes(zstd.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_text_equals_the_plain_file(tmp_path, tokenizer, sample_docs, small_chunks, compression):
    text = "\n".join(sample_docs)
    plain = load_or_build([_write(tmp_path / "a.txt", text, None)], tokenizer, _cfg(tmp_path, "p"))
    packed_path = _write(tmp_path / "b.txt", text, compression)
    assert resolve_files([str(tmp_path)])[1].compression == compression
    packed = load_or_build([packed_path], tokenizer, _cfg(tmp_path, "z"))
    assert np.array_equal(np.asarray(plain.train), np.asarray(packed.train))
    assert np.array_equal(np.asarray(plain.val), np.asarray(packed.val))


def _records(sample_docs) -> list[str]:
    return [p for d in sample_docs for p in d.split("\n") if p.strip()]


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_jsonl_records_round_trip(tmp_path, tokenizer, sample_docs, small_chunks, compression):
    docs = _records(sample_docs)
    lines = "".join(json.dumps({"id": i, "contenu": d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    path = _write(tmp_path / "docs.jsonl", lines, compression)
    data = load_source(Source(resolve_files([str(path)]), text_field="contenu"), tokenizer, _cfg(tmp_path))
    out = []
    for side in (data.train, data.val):
        ids = np.asarray(side).tolist()
        while ids:
            end = ids.index(tokenizer.eos_id)
            out.append(tokenizer.decode(ids[:end]))
            ids = ids[end + 1 :]
    assert sorted(out) == sorted(set(docs))  # every record once, whole, on one side
    assert data.meta["documents"] == len(set(docs)) and data.val.size > 0


def test_parquet_rows_round_trip(tmp_path, tokenizer, sample_docs, monkeypatch):
    pa = need_module("pyarrow", "reading parquet corpora")
    import pyarrow.parquet as pq

    monkeypatch.setattr(stream, "ROWS_PER_BATCH", 7)
    docs = _records(sample_docs)
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), tmp_path / "docs.parquet")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    a = load_or_build([tmp_path / "docs.parquet"], tokenizer, _cfg(tmp_path, "a"))
    b = load_or_build([jsonl], tokenizer, _cfg(tmp_path, "b"))
    assert np.array_equal(np.asarray(a.train), np.asarray(b.train))
    assert np.array_equal(np.asarray(a.val), np.asarray(b.val))


def test_exact_duplicates_are_dropped_and_counted(tmp_path, tokenizer, sample_docs):
    docs = _records(sample_docs)[:20]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:5]))
    data = load_or_build([tmp_path / "r.jsonl"], tokenizer, _cfg(tmp_path, "r"))
    assert data.meta["documents"] == 20 and data.meta["duplicates"] == 5
    (tmp_path / "t").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):  # b is a copy of a; c has a's size but other bytes
        (tmp_path / "t" / name).write_text(docs[0] + "\n" + docs[1] + "\n")
    (tmp_path / "t" / "c.txt").write_text((docs[0] + "\n" + docs[1] + "\n").upper())
    files = load_or_build([tmp_path / "t"], tokenizer, _cfg(tmp_path, "t"))
    assert files.meta["documents"] == 2 and files.meta["duplicates"] == 1
    kept = load_or_build([tmp_path / "t"], tokenizer, _cfg(tmp_path, "k", dedup=False))
    assert kept.meta["documents"] == 3 and kept.meta["duplicates"] == 0


def test_mixing_draws_sources_in_proportion_and_is_a_pure_function_of_the_step():
    draws = np.concatenate(
        [mixed_starts([10_000, 500], [0.7, 0.3], 64, 32, batch_generator(0, s))[0] for s in range(300)]
    )
    share = float(np.mean(draws == 0))
    assert abs(share - 0.7) < 0.02, share  # 19,200 draws: 6 standard errors
    a = mixed_starts([10_000, 500], [0.7, 0.3], 64, 32, batch_generator(0, 41))
    b = mixed_starts([10_000, 500], [0.7, 0.3], 64, 32, batch_generator(0, 41))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    which, starts = a
    assert (starts[which == 1] <= 500 - 32).all()  # every window fits inside its source


def test_sources_validate_apart_and_val_files_replace_the_tails(tmp_path, tokenizer, sample_docs):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("\n".join(sample_docs))
    (tmp_path / "b" / "y.txt").write_text("\n".join(sample_docs).upper())
    cfg = _cfg(tmp_path, sources=(f"{tmp_path / 'a'}=0.25", f"{tmp_path / 'b'}=0.75"))
    sources, val, _ = plan_sources(None, cfg)
    corpus = load_corpus(sources, val, tokenizer, cfg)
    assert [name for name, _ in corpus.val_parts] == ["a", "b"] and corpus.weights == [0.25, 0.75]
    assert corpus.report()["sources"]["b"]["weight"] == 0.75
    held = tmp_path / "held.txt"
    held.write_text(sample_docs[0])
    cfg = _cfg(tmp_path, val=(str(held),))
    sources, val, _ = plan_sources([str(tmp_path / "a")], cfg)
    corpus = load_corpus(sources, val, tokenizer, cfg)
    train, _ = single_pass([tmp_path / "a" / "x.txt"], tokenizer, val_fraction=1e-9)
    assert corpus.parts[0].val.size == 0 and corpus.train_tokens == train.size  # all of it trains
    assert tokenizer.decode(np.asarray(corpus.val[:-1])) == sample_docs[0]
    check_fits(corpus, 32)


def test_tokenizer_sample_is_bounded_seeded_and_whole_for_a_small_corpus(tmp_path, sample_docs):
    from llmkit.core.text.tokenizer import _lines

    paths = _corpus(tmp_path, sample_docs, copies=2)
    files = resolve_files([str(p) for p in paths])
    whole = stream.sample_lines(files, 10**6, 10**9)
    docs = [decode_text(p.read_bytes(), p) for p in paths]
    assert whole.lines == list(_lines(docs)) and whole.seen == len(whole.lines)
    some = stream.sample_lines(files, 50, 10**9, seed=1)
    assert len(some.lines) == 50 and some.seen == whole.seen
    assert some.lines == stream.sample_lines(files, 50, 10**9, seed=1).lines
    assert some.lines != stream.sample_lines(files, 50, 10**9, seed=2).lines
    assert set(some.lines) <= set(whole.lines)
    positions, at = [], 0
    for line in some.lines:  # a subsequence of the corpus: its order kept
        at = whole.lines.index(line, at)
        positions.append(at)
        at += 1
    assert positions[-1] > whole.seen // 2  # drawn from the whole corpus, not its first lines


def test_tokenizer_trains_on_a_sample_and_reports_it(tmp_path, sample_docs):
    from llmkit.core.text.tokenizer import train_on_files

    paths = _corpus(tmp_path, sample_docs, copies=2)
    cfg = TokenizerConfig(vocab_size=400, max_sentences=200)
    tok, report = train_on_files(resolve_files([str(p) for p in paths]), cfg)
    assert report.training_lines + report.held_out_lines == 200 < report.corpus_lines


# --- bad inputs: one clear line each ---------------------------------------------------------------


def test_a_damaged_shard_is_rebuilt_never_trusted(tmp_path, tokenizer, sample_docs, small_chunks):
    paths = _corpus(tmp_path, sample_docs, copies=1)
    data = load_or_build(paths, tokenizer, _cfg(tmp_path))
    want = np.asarray(data.train).copy()
    shard = data.path / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    again = load_or_build(paths, tokenizer, _cfg(tmp_path))
    assert not again.from_cache and "train-00001.bin" in again.meta["rebuilt"]
    assert np.array_equal(np.asarray(again.train), want)


def test_bad_inputs_each_give_one_line(tmp_path, tokenizer, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "un"}\n{"titre": "deux"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 has no field 'text' \(fields: titre\); give --text-field"):
        load_or_build([bad], tokenizer, _cfg(tmp_path))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "un"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2 is not valid JSON"):
        load_or_build([broken], tokenizer, _cfg(tmp_path))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"p.parquet: reading parquet files needs the 'pyarrow' package: pip install"):
        load_or_build([tmp_path / "p.parquet"], tokenizer, _cfg(tmp_path))
    with pytest.raises(ConfigError, match="--mix weights sum to 0.9, not 1"):
        parse_mix(["a=0.5", "b=0.4"])
    with pytest.raises(ConfigError, match="expected PATH=WEIGHT"):
        parse_mix(["wiki"])
    (tmp_path / "vide").mkdir()
    (tmp_path / "vide" / "rien.txt").write_text("  \n")
    (tmp_path / "plein.txt").write_text("Du texte.\n")
    with pytest.raises(DataError, match=r"source 'vide' is empty: .*rien.txt"):
        plan_sources(None, _cfg(tmp_path, sources=(f"{tmp_path / 'vide'}=0.5", f"{tmp_path / 'plein.txt'}=0.5")))
    gz = tmp_path / "cut.txt.gz"
    gz.write_bytes(gzip.compress(b"Bonjour.\n" * 1000)[:-20])
    with pytest.raises(DataError, match=r"cut.txt.gz: damaged or truncated file"):
        load_or_build([gz], tokenizer, _cfg(tmp_path))
    with pytest.raises(DataError, match="compresses itself"):
        resolve_files([str(_write(tmp_path / "x.parquet", "x", "gzip"))])


def test_pretrain_mixes_sources_and_reports_each_validation_loss(tmp_path, sample_docs):
    from test_cli import _sets, invoke

    (tmp_path / "novels").mkdir()
    (tmp_path / "novels" / "n.txt").write_text("\n".join(sample_docs))
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text("".join(json.dumps({"body": d}) + "\n" for d in _records(sample_docs) * 2))
    out = tmp_path / "run"
    result = invoke(
        "pretrain",
        "--mix",
        f"{tmp_path / 'novels'}=0.7",
        "--mix",
        f"{wiki}=0.3",
        "--text-field",
        "body",
        "-o",
        out,
        "--steps",
        4,
        *_sets(),
    )
    assert result.exit_code == 0, result.stderr
    assert "duplicate(s) dropped" in result.stderr and "novels" in result.stderr
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert evals and set(evals[-1]["val_sources"]) == {"novels", "wiki"}
    resumed = invoke("pretrain", "-o", out, "--resume", "auto", "--steps", 6, *_sets())  # the sources travel
    assert resumed.exit_code == 0, resumed.stderr
    both = invoke("pretrain", str(wiki), "--mix", f"{wiki}=1", "-o", tmp_path / "r2", "--steps", 1)
    assert both.exit_code == 1 and "not both" in both.stderr


def test_models_trained_with_a_leading_bos_get_one_everywhere(tmp_path, tokenizer, sample_docs):
    """Llama-family tokenizers (contract add_bos) put BOS before every text: documents of the token
    cache, classification rows, embedding rows, prompts — as transformers' tokenizers do."""
    from llmkit.core.text.examples import classify_ids, encode_prompt
    from llmkit.core.text.tokenizer import Tokenizer

    llama = Tokenizer(tokenizer.model_bytes, {**tokenizer.contract, "add_bos": True})
    bos = llama.bos_id
    assert llama.encode_text("Bonjour") == [bos, *tokenizer.encode("Bonjour")]
    assert tokenizer.encode_text("Bonjour") == tokenizer.encode("Bonjour")  # llmkit's own: none
    assert llama.encode_text("") == [bos] and classify_ids(llama, "Bonjour", 32)[0][0] == bos
    assert encode_prompt(llama, "Q : {prompt}\nR :", [("user", "Bonjour")])[0] == bos
    docs = _records(sample_docs)[:30]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "t.txt").write_text("\n".join(sample_docs))
    for path in (tmp_path / "r.jsonl", tmp_path / "t.txt"):
        plain = np.asarray(load_or_build([path], tokenizer, _cfg(tmp_path, "a")).train)
        with_bos = np.asarray(load_or_build([path], llama, _cfg(tmp_path, "b")).train)
        starts = [0] + [i + 1 for i in np.flatnonzero(plain == tokenizer.eos_id)[:-1]]
        assert with_bos.size == plain.size + len(starts)
        assert np.array_equal(np.delete(with_bos, [s + k for k, s in enumerate(starts)]), plain)
        assert (with_bos[[s + k for k, s in enumerate(starts)]] == bos).all()
