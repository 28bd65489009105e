"""Embeddings: padding invariance, order, formats, chunking, resume, search, CLI."""

import json

import numpy as np
import pytest
import torch
from test_cli import assert_one_line_error
from typer.testing import CliRunner

from llmkit.cli.app import app
from llmkit.core.config import POOLINGS, EmbedConfig
from llmkit.core.jobs import embed
from llmkit.core.jobs.embed import encode_to_file, load_index
from llmkit.core.model.transformer import Transformer
from llmkit.core.tasks.retrieval import embed_batch, embed_items, top_k

ITEMS = [
    "Le pain de campagne sort du four.",
    "La mer.",
    "Les abeilles dansent pour indiquer les fleurs.",
    "Un",
    "Le fromage de comté mûrit dans les caves du Jura.",
    "La ville rose.",
]


@pytest.fixture
def model(tiny_model_cfg):
    torch.manual_seed(0)
    return Transformer(tiny_model_cfg).eval()


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_padding_never_changes_a_vector(model, tokenizer, pooling, side, layer):
    s = EmbedConfig(pooling=pooling, pad_side=side, layer=layer)
    rows = [tokenizer.encode(t) for t in ITEMS]
    batched = embed_batch(model, rows, s)
    for i, r in enumerate(rows):
        alone = embed_batch(model, [r], s)[0]
        assert torch.allclose(batched[i], alone, atol=1e-5), (pooling, side, i)


def test_order_is_restored_after_length_sorting(model, tokenizer):
    s = EmbedConfig()
    vectors, truncated = embed_items(model, tokenizer, ITEMS, s, batch_size=4)
    assert truncated == 0
    for i, text in enumerate(ITEMS):
        alone, _ = embed_items(model, tokenizer, [text], s)
        assert np.allclose(vectors[i], alone[0], atol=1e-5)


def test_normalize_gives_unit_vectors_and_truncation_is_counted(model, tokenizer):
    vectors, truncated = embed_items(model, tokenizer, ITEMS, EmbedConfig(normalize=True, max_length=4))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert truncated == sum(len(tokenizer.encode(t)) > 4 for t in ITEMS) > 0


@pytest.mark.parametrize("ext", embed.FORMATS)
def test_each_format_round_trips(model, tokenizer, tmp_path, ext):
    out = tmp_path / f"index{ext}"
    s = EmbedConfig(pooling="last")
    meta = encode_to_file(model, tokenizer, ITEMS, out, s, model_id="m1", chunk=4)
    vectors, texts, saved = load_index(out)
    expected, _ = embed_items(model, tokenizer, ITEMS, s)
    assert vectors.shape == (len(ITEMS), model.cfg.d_model) and texts == ITEMS
    assert np.allclose(vectors, expected, atol=1e-6)
    assert saved["rows_done"] == meta["rows_done"] == len(ITEMS) and saved["pooling"] == "last"
    if ext == ".jsonl":
        assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == list(range(len(ITEMS)))


@pytest.mark.parametrize("ext", [".npy", ".safetensors", ".jsonl"])
def test_chunked_writing_equals_one_pass(model, tokenizer, tmp_path, ext):
    a, b = tmp_path / f"a{ext}", tmp_path / f"b{ext}"
    encode_to_file(model, tokenizer, ITEMS, a, EmbedConfig(), model_id="m", chunk=2)
    encode_to_file(model, tokenizer, ITEMS, b, EmbedConfig(), model_id="m", chunk=100)
    va, ta, _ = load_index(a)
    vb, tb, _ = load_index(b)
    assert ta == tb and np.allclose(va, vb, atol=1e-6)


def test_interrupted_run_resumes_from_rows_written(model, tokenizer, tmp_path):
    out = tmp_path / "r.npy"

    def stop_after_first_chunk(done, total, truncated):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_to_file(
            model, tokenizer, ITEMS, out, EmbedConfig(), model_id="m", chunk=2, on_progress=stop_after_first_chunk
        )
    seen = []
    encode_to_file(
        model,
        tokenizer,
        ITEMS,
        out,
        EmbedConfig(),
        model_id="m",
        chunk=2,
        resume=True,
        on_progress=lambda d, t, x: seen.append(d),
    )
    assert seen[0] == 2  # started where it stopped
    full = tmp_path / "full.npy"
    encode_to_file(model, tokenizer, ITEMS, full, EmbedConfig(), model_id="m")
    assert np.allclose(load_index(out)[0], load_index(full)[0], atol=1e-6)
    assert load_index(out)[1] == ITEMS


def test_search_returns_the_item_itself_first(model, tokenizer, tmp_path):
    out = tmp_path / "i.npy"
    encode_to_file(model, tokenizer, ITEMS, out, EmbedConfig(), model_id="m")
    vectors, texts, _ = load_index(out)
    for i, text in enumerate(ITEMS):
        q, _ = embed_items(model, tokenizer, [text], EmbedConfig())
        assert top_k(q, vectors, 3)[1][0, 0] == i


# --- CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


def enc(*args, input=None):
    return runner.invoke(app, ["encode", *[str(a) for a in args]], input=input)


def test_cli_encode_and_search(trained_run, tmp_path):
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"t": t}, ensure_ascii=False) + "\n" for t in ITEMS))
    out = tmp_path / "vec.safetensors"
    r = enc(trained_run, src, "--field", "t", "-o", out, "--normalize", "--pooling", "mean", "--layer", -2)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out) and "vectors of dimension" in r.stderr
    r = enc(trained_run, "--query", ITEMS[2], "--index", out, "--top-k", 2)
    assert r.exit_code == 0, r.output
    assert "nearest items" in r.stdout and ITEMS[2] in r.stdout.split("\n")[4]
    csv_in = tmp_path / "d.csv"
    csv_in.write_text("id,phrase\n1,Le pain\n2,La mer\n")
    assert enc(trained_run, csv_in, "--column", "phrase", "-o", tmp_path / "c.npy").exit_code == 0
    assert enc(trained_run, "-", "-o", tmp_path / "s.jsonl", input="Le pain\nLa mer\n").exit_code == 0


def test_cli_encode_errors(trained_run, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    assert_one_line_error(enc(trained_run, empty, "-o", tmp_path / "x.npy"), "no items to encode")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a"}\n{"other": "b"}\n')
    assert_one_line_error(enc(trained_run, bad, "-o", tmp_path / "x.npy"), "line 2 has no field 'text'")
    ok = tmp_path / "ok.txt"
    ok.write_text("Le pain\n")
    assert_one_line_error(enc(trained_run, ok, "-o", tmp_path / "x.parquet"), "unsupported extension .parquet")
    assert_one_line_error(
        enc(trained_run, ok, "-o", tmp_path / "x.npy", "--layer", 9), "out of range: this model has layers -3..2"
    )
    index = tmp_path / "i.npy"
    assert enc(trained_run, ok, "-o", index).exit_code == 0
    meta = json.loads(embed.meta_path(index).read_text())
    meta["model_hash"] = "someone-else"
    embed.meta_path(index).write_text(json.dumps(meta))
    assert_one_line_error(enc(trained_run, "--query", "Le pain", "--index", index), "built by another model")


def test_float16_output_is_stored_as_float16(model, tokenizer, tmp_path):
    out = tmp_path / "h.npy"
    encode_to_file(model, tokenizer, ITEMS, out, EmbedConfig(dtype="float16"), model_id="m")
    assert np.load(out).dtype == np.float16
    full, _ = embed_items(model, tokenizer, ITEMS, EmbedConfig())
    assert np.allclose(load_index(out)[0], full, atol=1e-2)


def test_file_source_streams_the_same_items_and_names_bad_bytes(tmp_path):
    f = tmp_path / "in.csv"
    f.write_text('id,t\n1,"Le pain, chaud"\n2,"La mer\nmonte"\n', encoding="utf-8")
    src = embed.ItemSource.from_file(f, column="t").scan()
    assert list(src) == ["Le pain, chaud", "La mer\nmonte"] and src.n == 2
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Le pain\n" + "été".encode("latin-1") + b"\n")
    with pytest.raises(embed.DataError, match="not valid UTF-8 at byte offset 8"):
        embed.ItemSource.from_file(bad).scan()


def test_a_search_whose_scores_are_all_alike_is_flagged():
    """Every top-5 hit of a search with SmolLM2 scored 0.9992-0.9997, and nothing said so."""
    from llmkit.core.jobs.embed import flat_ranking

    assert flat_ranking([(0, 0.9997, "a"), (1, 0.9995, "b"), (2, 0.9992, "c")])
    assert not flat_ranking([(0, 0.71, "a"), (1, 0.69, "b"), (2, 0.68, "c")])
    assert not flat_ranking([(0, 0.9997, "a"), (1, 0.9996, "b")])  # two hits say too little
