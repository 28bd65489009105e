"""`llmkit inspect`: the numbers behind the pictures are the model's own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import need_module

from llmkit.core.jobs import introspect as ins
from llmkit.core.store.checkpoint import load_model

TEXT = "Le chat dort sur le canapé. La mer est calme."


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_model(trained_run)


def test_attention_rows_sum_to_one_and_are_the_models_own(loaded):
    model, ckpt = loaded
    att = ins.attention(model, ckpt.tokenizer, TEXT)
    L, H, T, _ = att.weights.shape
    assert (L, H) == (model.cfg.n_layer, model.cfg.n_head)
    assert np.allclose(att.weights.sum(-1), 1, atol=1e-5)
    assert np.all(np.triu(att.weights, 1) == 0)  # nothing attends to the future
    # The probabilities, times the values, through o_proj, give the block's attention output as
    # scaled_dot_product_attention computes it: they are what the model uses.
    ids = torch.tensor([ckpt.tokenizer.encode_text(TEXT)])
    with torch.no_grad():
        h = model.embed(ids)
        for layer, block in enumerate(model.blocks):
            a = block.attn
            n = block.attn_norm(h)
            v = a.v_proj(n).view(1, T, a.n_kv, a.head_dim).transpose(1, 2)
            v = v.repeat_interleave(a.n_head // a.n_kv, dim=1)  # (1, H, T, D)
            by_hand = torch.from_numpy(att.weights[layer])[None] @ v  # (1, H, T, D)
            mine = a.o_proj(by_hand.transpose(1, 2).reshape(1, T, -1))
            theirs = a(n, (model.rope_cos[:T], model.rope_sin[:T]), None)
            assert torch.allclose(mine, theirs, atol=1e-5), layer
            h = block(h, (model.rope_cos[:T], model.rope_sin[:T]), None)
    heads = att.heads()
    assert len(heads) == L * H and all(0 <= x["first"] <= 1 and x["entropy"] >= 0 for x in heads)


def test_logit_lens_last_layer_is_the_models_output(loaded):
    model, ckpt = loaded
    lens = ins.logit_lens(model, ckpt.tokenizer, TEXT)
    ids = torch.tensor([ckpt.tokenizer.encode_text(TEXT)])
    with torch.no_grad():
        logits = model(ids)[0].float().numpy()
    assert np.allclose(lens.final_logits, logits, atol=1e-5)
    assert len(lens.predicted) == model.cfg.n_layer + 1 and lens.prob.shape == (model.cfg.n_layer + 1, ids.size(1))
    assert lens.predicted[-1] == [ckpt.tokenizer.token_text(int(i)) for i in logits.argmax(-1)]


def test_surprisal_is_the_eval_loss_on_the_same_text(loaded):
    from llmkit.core.training.loop import mean_token_loss

    model, ckpt = loaded
    s = ins.surprise(model, ckpt.tokenizer, TEXT)
    ids = torch.tensor([ckpt.tokenizer.encode_text(TEXT)])
    loss, n, _ = mean_token_loss(model, [(ids[:, :-1], ids[:, 1:])], "cpu")
    assert n == len(s.prob) and abs(s.mean_nats - loss) < 1e-5
    assert np.allclose(np.asarray(s.bits), -np.log2(s.prob), atol=1e-5)
    assert all(len(t) == 5 and t[0][1] >= t[-1][1] for t in s.top)


def test_tokens_mark_byte_fallback_and_count_characters(loaded):
    _, ckpt = loaded
    t = ins.tokens(ckpt.tokenizer, "Le chat 🐈 dort")
    assert ckpt.tokenizer.decode(t.ids) == "Le chat 🐈 dort"
    assert any(t.byte_fallback) and t.chars_per_token == pytest.approx(len("Le chat 🐈 dort") / len(t.ids))


def test_the_embedding_map_of_a_separable_set_agrees_everywhere():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, (20, 16)) + 3
    b = rng.normal(0, 0.1, (20, 16)) - 3
    m = ins.embedding_map(np.concatenate([a, b]), ["a"] * 20 + ["b"] * 20)
    assert m.neighbour_agreement == 1.0 and m.points.shape == (40, 2) and m.explained[0] > 0.9
    shuffled = ins.embedding_map(rng.normal(size=(40, 16)), ["a", "b"] * 20)
    assert shuffled.neighbour_agreement < 0.8


def test_the_command_draws_every_view_and_prints_a_reading(trained_run, tmp_path):
    need_module("matplotlib", "the pictures of llmkit inspect")
    from test_cli import invoke

    out = tmp_path / "pics"
    r = invoke("inspect", trained_run, "--text", "La ville de Lyon. 🐈", "-o", out, "--format", "svg")
    assert r.exit_code == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention.svg", "logit-lens.svg", "surprise.svg", "tokens.svg"]
    assert all(p.read_text().lstrip().startswith("<?xml") for p in out.iterdir())
    assert "tokens:" in r.stderr and "surprise:" in r.stderr and "logit lens" in r.stderr
    one = invoke("inspect", trained_run, "--text", "La ville de", "--attention", "--layer", 1, "--head", 0, "-o", out)
    assert one.exit_code == 0 and (out / "attention-L1H0.png").is_file()
    data = json.loads(invoke("inspect", trained_run, "--text", "La ville de", "--surprise", "--json").stdout)
    assert set(data) == {"surprise"} and len(data["surprise"]["bits"]) == len(data["surprise"]["pieces"]) - 1


def test_the_embedding_map_from_encode_output(trained_run, tmp_path):
    need_module("matplotlib", "the pictures of llmkit inspect")
    from test_cli import invoke

    vectors = np.concatenate([np.ones((5, 8)), -np.ones((5, 8))]) + np.random.default_rng(0).normal(0, 0.01, (10, 8))
    np.save(tmp_path / "v.npy", vectors.astype(np.float32))
    (tmp_path / "labels.txt").write_text("\n".join(["a"] * 5 + ["b"] * 5))
    r = invoke("inspect", "--embeddings", tmp_path / "v.npy", "--labels", tmp_path / "labels.txt", "-o", tmp_path)
    assert r.exit_code == 0, r.stderr
    assert "100.0%" in r.stderr and (tmp_path / "embeddings.png").is_file()


def test_inspect_refuses_bad_requests_in_one_line(trained_run, tmp_path):
    from test_cli import assert_one_line_error, invoke

    assert_one_line_error(invoke("inspect", trained_run), "give the text with --text or --file")
    assert_one_line_error(invoke("inspect", trained_run, "--text", "x", "--head", 0), "--head needs --layer")
    assert_one_line_error(
        invoke("inspect", trained_run, "--text", "x", "--attention", "--layer", 9), "--layer must be 0.."
    )
    assert_one_line_error(invoke("inspect", trained_run, "--text", "mot " * 100), "over the model's context")
    assert_one_line_error(invoke("inspect", trained_run, "--text", "x", "--format", "gif"), "png or svg")
    (tmp_path / "bad.npy").write_text("no")
    assert_one_line_error(invoke("inspect", "--embeddings", tmp_path / "bad.npy"), "not a .npy array")


def test_every_checkpoint_kind_can_be_inspected(trained_run, tmp_path):
    """A classifier, too: the views read its trunk and LM head; umap without its package is one line."""
    from pathlib import Path

    from test_cli import assert_one_line_error, invoke

    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    clf = tmp_path / "clf"
    assert (
        invoke(
            "finetune",
            trained_run,
            "--task",
            "classify",
            "--data",
            data / "avis.train.jsonl",
            "--val",
            data / "avis.dev.jsonl",
            "--steps",
            2,
            "-o",
            clf,
            "--quiet",
        ).exit_code
        == 0
    )
    r = invoke("inspect", clf, "--text", "Un repas parfait.", "--json")
    assert r.exit_code == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"tokens", "attention", "surprise", "logit_lens"}
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    try:
        import umap  # noqa: F401
    except ImportError:
        assert_one_line_error(
            invoke("inspect", "--embeddings", tmp_path / "v.npy", "--method", "umap", "--json"),
            "needs the umap-learn package",
        )
