"""Retrieval: the metrics and the contrastive loss against hand computations, the retrieval set
of a pairs file, fine-tuning --task embed (resume exact, settings recorded and used by encode,
eval and the server)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_finetune import assert_resume_is_exact, run_finetune, write_jsonl
from typer.testing import CliRunner

from llmkit.cli.app import app
from llmkit.core.config import EmbedConfig, TaskConfig, embed_settings
from llmkit.core.jobs.evaluate import evaluate_checkpoint
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.tasks.retrieval import (
    RetrievalSet,
    info_nce,
    reciprocal_rank_fusion,
    retrieval_scores,
    top_k,
)
from llmkit.core.text.examples import Example, read_examples

# --- metrics, by hand --------------------------------------------------------------------------------


def test_retrieval_scores_match_a_hand_computation():
    # Query 0: its one relevant row (7) ranked 3rd. Query 1: relevant {1, 2}, ranked 1st and 12th
    # (past the cut). Query 2: relevant row never returned.
    ranked = [[4, 5, 7, 0], [1, *range(10, 20), 2], [3, 4, 5]]
    relevant = [frozenset({7}), frozenset({1, 2}), frozenset({9})]
    got = retrieval_scores(ranked, relevant)
    assert got["recall@1"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert got["recall@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["mrr@10"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    ndcg0 = (1 / math.log2(4)) / 1.0  # hit at rank 3, ideal: rank 1
    ndcg1 = 1.0 / (1.0 + 1 / math.log2(3))  # hit at rank 1, ideal: ranks 1 and 2
    assert got["ndcg@10"] == pytest.approx((ndcg0 + ndcg1 + 0) / 3)


def test_reciprocal_rank_fusion_reads_ranks_only():
    bm25 = [[0, 1, 2]]
    dense = [[2, 0, 3]]
    fused = reciprocal_rank_fusion([bm25, dense], k=60)[0]
    # 0: 1/61 + 1/62; 2: 1/63 + 1/61; 1: 1/62; 3: 1/63
    assert fused == [0, 2, 1, 3]


def test_top_k_is_exact_cosine_search():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(500, 16)).astype(np.float32)
    queries = corpus[[3, 77, 499]] * 5.0  # scaled: cosine ignores length
    scores, rows = top_k(queries, corpus, 4, block=2)
    assert rows[:, 0].tolist() == [3, 77, 499]
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    norm = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    brute = np.argsort(-(norm[[3, 77, 499]] @ norm.T), axis=1)[:, :4]
    assert (rows == brute).all()


def test_a_pairs_file_is_a_retrieval_set_each_passage_once():
    examples = [
        Example(1, text="q0", positives=("para A",)),
        Example(2, text="q1", positives=("para B",), negatives=("para C",)),
        Example(3, text="q2", positives=("para A",)),  # two questions on one paragraph
    ]
    rset = RetrievalSet.from_examples(examples, extra=["para D", "para B"])
    assert rset.corpus == ["para A", "para B", "para C", "para D"]
    assert rset.relevant == [frozenset({0}), frozenset({1}), frozenset({0})]


# --- the contrastive loss, by hand -------------------------------------------------------------------


def test_info_nce_matches_a_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    p = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    n = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    t = 0.5
    s = 1 / math.sqrt(2)
    # query 0 scores [s, 0, 1] / t, answer 0; query 1 scores [s, 1, 0] / t, answer 1
    loss0 = -math.log(math.exp(s / t) / (math.exp(s / t) + math.exp(0) + math.exp(1 / t)))
    loss1 = -math.log(math.exp(1 / t) / (math.exp(s / t) + math.exp(1 / t) + math.exp(0)))
    got = info_nce(q, p, n, temperature=t)
    assert got.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-5)
    # Without hard negatives: in-batch only.
    loss0b = -math.log(math.exp(s / t) / (math.exp(s / t) + 1.0))
    loss1b = -math.log(math.exp(1 / t) / (math.exp(s / t) + math.exp(1 / t)))
    assert info_nce(q, p, temperature=t).item() == pytest.approx((loss0b + loss1b) / 2, rel=1e-5)


def test_info_nce_never_counts_the_same_passage_as_a_negative():
    q = F.normalize(torch.randn(3, 8), dim=-1)
    p = F.normalize(torch.randn(3, 8), dim=-1)
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    got = info_nce(q, p, temperature=0.1, same=same)
    logits = q @ p.T / 0.1
    by_hand = [
        -torch.log_softmax(logits[0, [0, 2]], 0)[0],  # row 1 holds query 0's passage too: left out
        -torch.log_softmax(logits[1, [1, 2]], 0)[0],
        -torch.log_softmax(logits[2], 0)[2],
    ]
    assert got.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)


# --- reading pairs -----------------------------------------------------------------------------------


def test_embed_rows_read_pairs_negatives_and_bitext(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"query": "Où est Paris ?", "positive": "Paris est en France.", "negative": ["Rome est en Italie."]},
            {"src": "le chat", "tgt": "the cat"},
            {"query": "", "positive": "vide"},
        ],
    )
    got = read_examples(path, TaskConfig(kind="embed"))
    assert [(e.text, e.positives, e.negatives) for e in got.examples] == [
        ("Où est Paris ?", ("Paris est en France.",), ("Rome est en Italie.",)),
        ("le chat", ("the cat",), ()),
    ]
    assert got.blank == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "positive": 3}])
    with pytest.raises(Exception, match="must be a text or a list of texts"):
        read_examples(bad, TaskConfig(kind="embed"))


def test_an_embedding_model_brings_its_own_settings():
    task = TaskConfig(kind="embed", pooling="mean", query_prefix="q: ", passage_prefix="p: ")
    s = embed_settings(task)
    assert (s.pooling, s.normalize, s.prefix, s.query_prefix) == ("mean", True, "p: ", "q: ")
    assert embed_settings(task, pooling="last", normalize=None).pooling == "last"
    assert embed_settings(TaskConfig(kind="lm")) == EmbedConfig()


# --- fine-tuning --task embed ------------------------------------------------------------------------

FACTS = [
    ("Quelle est la capitale de la France ?", "Paris est la capitale de la France."),
    ("Où coule la Loire ?", "La Loire traverse Orléans, Tours et Nantes."),
    ("Qui a écrit Madame Bovary ?", "Gustave Flaubert publie Madame Bovary en 1857."),
    ("Quel est le plus haut sommet des Alpes ?", "Le mont Blanc culmine à 4 806 mètres."),
    ("Quand la Bastille est-elle prise ?", "La Bastille tombe le 14 juillet 1789."),
    ("Que mange le chat ?", "Le chat mange des croquettes et boit du lait."),
    ("De quelle couleur est le ciel ?", "Par beau temps, le ciel est bleu."),
    ("Combien de pattes a une araignée ?", "Une araignée a huit pattes."),
    ("Où vit le manchot ?", "Le manchot vit dans l'hémisphère Sud, souvent sur la glace."),
    ("Que fait le boulanger ?", "Le boulanger pétrit la pâte et cuit le pain la nuit."),
    ("Qu'est-ce que le Rhône ?", "Le Rhône est un fleuve qui naît en Suisse et rejoint la Méditerranée."),
    ("Qui peint les Nymphéas ?", "Claude Monet peint les Nymphéas à Giverny."),
]


@pytest.fixture
def qa_pairs(tmp_path):
    rows = [{"query": q, "positive": p} for q, p in FACTS]
    rows[0]["negative"] = "Berlin est la capitale de l'Allemagne."
    return write_jsonl(tmp_path / "qa.jsonl", rows)


EMBED_SETS = ("train.batch_size=4", "optim.lr=3e-3", "task.val_fraction=0.25")


def test_finetune_embed_records_its_settings_and_scores_retrieval(trained_run, qa_pairs, tmp_path):
    result, events = run_finetune(trained_run, tmp_path / "e", [qa_pairs], "train.steps=4", *EMBED_SETS, task="embed")
    ckpt = ckpt_io.read_checkpoint(result.last)
    assert ckpt.kind == "embed"
    assert (ckpt.task.pooling, ckpt.task.query_prefix, ckpt.task.passage_prefix) == ("mean", "query: ", "passage: ")
    evals = [d for k, d in events if k == "eval"]
    assert evals[-1]["metric"] == "ndcg@10" and evals[-1]["corpus"] == 3
    assert {"recall@1", "recall@10", "mrr@10", "val_loss"} <= set(evals[-1])
    data = next(d for k, d in events if k == "finetune_data")
    assert data["kind"] == "embed" and data["negatives"] >= 0
    # eval on the whole file, through the same encoder, by hand: the same figures.
    report = evaluate_checkpoint(result.last, [str(qa_pairs)])
    assert report["task"] == "embed" and report["queries"] == len(FACTS) and report["corpus"] == len(FACTS) + 1
    from llmkit.core.interop.resolve import open_model
    from llmkit.core.tasks.retrieval import encode_set

    model, opened = open_model(result.last, "cpu")
    rset = RetrievalSet.from_examples(read_examples(qa_pairs, opened.task).examples)
    q, d = encode_set(model, opened.tokenizer, rset, embed_settings(opened.task), batch_size=16, device="cpu")
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)  # unit vectors
    _, ranked = top_k(q, d, 10)
    assert report["ndcg@10"] == pytest.approx(retrieval_scores(ranked.tolist(), rset.relevant)["ndcg@10"])


def test_finetune_embed_learns_the_pairs(trained_run, qa_pairs, tmp_path):
    before = evaluate_checkpoint(trained_run / "best", [str(qa_pairs)], retrieval={})
    result, _ = run_finetune(
        trained_run, tmp_path / "e", [qa_pairs], "train.steps=30", *EMBED_SETS, "train.eval_every=30", task="embed"
    )
    after = evaluate_checkpoint(result.last, [str(qa_pairs)])
    assert after["mrr@10"] > before["mrr@10"] + 0.2, (before["mrr@10"], after["mrr@10"])


def test_finetune_embed_resume_is_exact(trained_run, qa_pairs, tmp_path):
    sets = ("train.steps=4", *EMBED_SETS, "train.save_every=2", "train.eval_every=2", "train.keep_checkpoints=0")
    assert_resume_is_exact(trained_run, qa_pairs, tmp_path, sets, "embed", "model.safetensors")


def test_finetune_embed_with_lora(trained_run, qa_pairs, tmp_path):
    result, _ = run_finetune(
        trained_run, tmp_path / "l", [qa_pairs], "train.steps=2", *EMBED_SETS, "lora.enabled=true", task="embed"
    )
    assert ckpt_io.read_checkpoint(result.last).has_adapter
    assert evaluate_checkpoint(result.last, [str(qa_pairs)])["queries"] == len(FACTS)


# --- the commands ---------------------------------------------------------------------------------------


def test_encode_and_search_use_the_models_prefixes(trained_run, qa_pairs, tmp_path):
    result, _ = run_finetune(trained_run, tmp_path / "e", [qa_pairs], "train.steps=2", *EMBED_SETS, task="embed")
    passages = tmp_path / "passages.txt"
    passages.write_text("\n".join(p for _, p in FACTS) + "\n", encoding="utf-8")
    runner = CliRunner()
    out = tmp_path / "v.npy"
    r = runner.invoke(app, ["encode", str(result.last), str(passages), "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "v.npy.meta.json").read_text())
    assert (meta["pooling"], meta["normalize"], meta["prefix"], meta["query_prefix"]) == (
        "mean",
        True,
        "passage: ",
        "query: ",
    )
    # The stored vectors are those of each passage behind the passage prefix.
    from llmkit.core.interop.resolve import open_model
    from llmkit.core.tasks.retrieval import embed_items

    model, ckpt = open_model(result.last, "cpu")
    by_hand, _ = embed_items(
        model, ckpt.tokenizer, ["passage: " + FACTS[2][1]], EmbedConfig(pooling="mean", normalize=True)
    )
    assert np.allclose(np.load(out)[2], by_hand[0], atol=1e-5)
    r = runner.invoke(app, ["encode", str(result.last), "--query", FACTS[2][0], "--index", str(out), "--json"])
    assert r.exit_code == 0, r.output
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    q, _ = embed_items(model, ckpt.tokenizer, ["query: " + FACTS[2][0]], EmbedConfig(pooling="mean", normalize=True))
    expected = int(np.argmax(np.load(out) @ q[0]))
    assert hits[0]["id"] == expected


def test_eval_retrieval_of_a_language_model_in_json(trained_run, qa_pairs, tmp_path):
    extra = tmp_path / "more.txt"
    extra.write_text("Un texte de plus.\nEncore un autre.\n", encoding="utf-8")
    r = CliRunner().invoke(
        app, ["eval", str(trained_run), str(qa_pairs), "--retrieval", "--center", "--corpus", str(extra), "--json"]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["task"] == "embed" and report["center"] and report["pooling"] == "mean"
    assert report["corpus"] == len(FACTS) + 1 + 2
    assert 0.0 <= report["ndcg@10"] <= 1.0
    r = CliRunner().invoke(app, ["eval", str(trained_run), str(qa_pairs), "--retrieval"])
    assert r.exit_code == 0 and "nDCG@10" in r.stdout


def test_generate_refuses_an_embedding_model(trained_run, qa_pairs, tmp_path):
    result, _ = run_finetune(trained_run, tmp_path / "e", [qa_pairs], "train.steps=1", *EMBED_SETS, task="embed")
    r = CliRunner().invoke(app, ["generate", str(result.last), "-p", "Bonjour"])
    assert r.exit_code == 1 and "llmkit encode" in r.output


# --- recomputed activations ------------------------------------------------------------------------


def test_recomputed_blocks_give_the_same_gradients(tiny_model_cfg):
    from llmkit.core.model import fast
    from llmkit.core.model.transformer import Transformer

    torch.manual_seed(0)
    plain = Transformer(tiny_model_cfg).train()
    again = Transformer(tiny_model_cfg).train()
    again.load_state_dict(plain.state_dict())
    fast.recompute(again)
    x = torch.randint(0, tiny_model_cfg.vocab_size, (2, 12))
    for m in (plain, again):
        m(x).float().logsumexp(-1).mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), again.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert set(plain.state_dict()) == set(again.state_dict())


def test_recompute_turns_on_when_activations_would_not_fit(tiny_model_cfg, monkeypatch):
    from llmkit.core.training import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 10 << 30)
    cpu = torch.device("cpu")
    assert memory.plan_recompute("auto", tiny_model_cfg, 1000, cpu)[0] is False
    per_token = tiny_model_cfg.n_layer * tiny_model_cfg.d_model * memory.ACT_BYTES
    on, why = memory.plan_recompute("auto", tiny_model_cfg, (6 << 30) // per_token, cpu)
    assert on and "GB available" in why
    assert memory.plan_recompute("off", tiny_model_cfg, 10**9, cpu) == (False, "train.recompute=off")
    assert memory.plan_recompute("on", tiny_model_cfg, 1, cpu)[0] is True
    assert memory.available_memory(cpu) > 0


# --- the approximate index -----------------------------------------------------------------------------


def _vectors_file(tmp_path, vectors):
    from dataclasses import asdict

    from llmkit.core.jobs.embed import Writer

    out = tmp_path / "v.npy"
    meta = {"model_hash": "m", "input_hash": "h", **asdict(EmbedConfig())}
    w = Writer(out, len(vectors), vectors.shape[1], meta, resume=False)
    w.write(vectors, [f"item {i}" for i in range(len(vectors))])
    return out


def test_the_index_finds_the_exact_neighbours_on_a_small_set(tmp_path):
    pytest.importorskip("faiss", reason="the retrieval extra (faiss-cpu) is not installed")
    from llmkit.core.jobs import ann
    from llmkit.core.jobs.embed import load_index, vectors_of

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(1000, 32)).astype(np.float32)
    out = _vectors_file(tmp_path, vectors)
    settings = ann.build_index(out, vectors_of(out))
    assert settings["rows_indexed"] == 1000 and ann.ann_path(out).is_file()
    assert settings["cells"] <= settings["nprobe"]  # a small set: every cell is read, the search is exact
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    scores, rows = ann.Ann(out, load_index(out)[2]).search(queries, 5)
    exact_scores, exact_rows = top_k(queries, vectors, 5)
    assert [set(r) for r in rows.tolist()] == [set(r) for r in exact_rows.tolist()]
    assert np.allclose(scores, exact_scores, atol=2e-3)  # the index holds f16 codes


def test_an_interrupted_index_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    pytest.importorskip("faiss", reason="the retrieval extra (faiss-cpu) is not installed")
    from llmkit.core.jobs import ann
    from llmkit.core.jobs.embed import load_index, vectors_of

    vectors = np.random.default_rng(1).normal(size=(1000, 16)).astype(np.float32)
    out = _vectors_file(tmp_path, vectors)
    monkeypatch.setattr(ann, "BLOCK", 300)

    def stop_after_two_blocks(done, total):
        if done >= 600:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ann.build_index(out, vectors_of(out), on_progress=stop_after_two_blocks)
    meta = load_index(out)[2]
    assert meta["ann"]["rows_indexed"] == 600
    with pytest.raises(Exception, match="holds 600 of 1000 rows"):
        ann.Ann(out, meta)
    seen = []
    ann.build_index(out, vectors_of(out), resume=True, on_progress=lambda d, t: seen.append(d))
    assert seen[0] == 600 and seen[-1] == 1000
    index = ann.Ann(out, load_index(out)[2])
    assert index.index.ntotal == 1000
    assert index.search(vectors[[5, 999]], 1)[1][:, 0].tolist() == [5, 999]


def test_encode_ann_then_search_it_and_refuse_another_model(trained_run, qa_pairs, tmp_path):
    pytest.importorskip("faiss", reason="the retrieval extra (faiss-cpu) is not installed")
    passages = tmp_path / "passages.txt"
    passages.write_text("\n".join(p for _, p in FACTS) + "\n", encoding="utf-8")
    runner = CliRunner()
    out = tmp_path / "v.npy"
    r = runner.invoke(app, ["encode", str(trained_run), str(passages), "-o", str(out), "--ann"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v.npy.ann").is_file()
    args = ["encode", str(trained_run), "--query", FACTS[3][1], "--index", str(out), "--json"]
    approx = [json.loads(line) for line in runner.invoke(app, args).stdout.splitlines()]
    exact = [json.loads(line) for line in runner.invoke(app, [*args, "--exact"]).stdout.splitlines()]
    assert approx[0]["id"] == exact[0]["id"] == 3
    other, _ = run_finetune(trained_run, tmp_path / "e", [qa_pairs], "train.steps=1", *EMBED_SETS, task="embed")
    r = runner.invoke(app, ["encode", str(other.last), "--query", "x", "--index", str(out)])
    assert r.exit_code == 1 and "built by another model" in r.output


# --- the server -----------------------------------------------------------------------------------------


def test_the_server_embeds_with_the_models_prefixes_and_searches_its_index(trained_run, qa_pairs, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from llmkit.core.interop.resolve import open_model
    from llmkit.core.tasks.retrieval import embed_items
    from llmkit.serve.api import Server, create_app

    result, _ = run_finetune(trained_run, tmp_path / "e", [qa_pairs], "train.steps=2", *EMBED_SETS, task="embed")
    passages = tmp_path / "passages.txt"
    passages.write_text("\n".join(p for _, p in FACTS) + "\n", encoding="utf-8")
    out = tmp_path / "v.npy"
    assert (
        CliRunner().invoke(app, ["encode", str(result.last), str(passages), "-o", str(out), "--quiet"]).exit_code == 0
    )
    model, ckpt = open_model(result.last, "cpu")
    s = EmbedConfig(pooling="mean", normalize=True)
    with TestClient(create_app(Server(result.last, index=out))) as http:
        doc = http.post("/v1/embeddings", json={"input": [FACTS[0][1]]}).json()["data"][0]["embedding"]
        query = http.post("/v1/embeddings", json={"input": [FACTS[0][0]], "input_type": "query"}).json()
        want_doc, _ = embed_items(model, ckpt.tokenizer, ["passage: " + FACTS[0][1]], s)
        want_query, _ = embed_items(model, ckpt.tokenizer, ["query: " + FACTS[0][0]], s)
        assert np.allclose(doc, want_doc[0], atol=1e-5)
        assert np.allclose(query["data"][0]["embedding"], want_query[0], atol=1e-5)
        bad = http.post("/v1/embeddings", json={"input": ["x"], "input_type": "image"})
        assert bad.status_code == 400 and "input_type" in bad.json()["error"]["message"]
        hits = http.post("/v1/search", json={"query": FACTS[5][0], "top_k": 3}).json()["data"]
        expected = np.argsort(-(np.load(out) @ want_query_of(model, ckpt, FACTS[5][0], s)))[:3].tolist()
        assert [h["id"] for h in hits] == expected and hits[0]["text"] == FACTS[expected[0]][1]
        assert http.post("/v1/search", json={"query": ""}).status_code == 400
        assert http.post("/v1/search", json={"query": "x", "top_k": 1000}).status_code == 400
    with pytest.raises(Exception, match="built by another model"):
        Server(trained_run, index=out)


def want_query_of(model, ckpt, text, s):
    from llmkit.core.tasks.retrieval import embed_items

    return embed_items(model, ckpt.tokenizer, ["query: " + text], s)[0][0]
