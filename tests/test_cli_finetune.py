"""`llmkit finetune`, `classify` and `eval` through CliRunner: happy paths and every bad input."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_SETS
from test_cli import assert_one_line_error
from test_finetune import SUMMER, WINTER, write_jsonl
from typer.testing import CliRunner

from llmkit.cli.app import app

runner = CliRunner()
FAST = [
    "--set",
    "train.eval_every=2",
    "--set",
    "train.log_every=1",
    "--set",
    "optim.warmup_steps=1",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.device=cpu",
    "--set",
    "train.dtype=fp32",
]


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"text": t, "label": "été"} for t in SUMMER] + [{"text": t, "label": "hiver"} for t in WINTER]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "dev.jsonl", rows[:3] + rows[-3:] + [{"text": "Les feuilles tombent.", "label": "automne"}])
    (d / "train.csv").write_text("phrase,saison\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows))
    write_jsonl(
        d / "pairs.jsonl",
        [
            {"src": f"le {w} dort", "tgt": f"the {e} sleeps"}
            for w, e in (
                ("chat", "cat"),
                ("chien", "dog"),
                ("roi", "king"),
                ("loup", "wolf"),
                ("lion", "lion"),
                ("ours", "bear"),
            )
        ],
    )
    write_jsonl(
        d / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": f"Capitale de {p} ?"}, {"role": "assistant", "content": c}]}
            for p, c in (
                ("France", "Paris"),
                ("Italie", "Rome"),
                ("Espagne", "Madrid"),
                ("Portugal", "Lisbonne"),
                ("Grèce", "Athènes"),
            )
        ],
    )
    return d


@pytest.fixture(scope="module")
def classifier(trained_run, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "run"
    r = invoke(
        "finetune",
        trained_run,
        "--task",
        "classify",
        "--data",
        data / "train.jsonl",
        "--val",
        data / "dev.jsonl",
        "--out",
        out,
        "--steps",
        4,
        *FAST,
    )
    assert r.exit_code == 0, r.output
    assert "1 validation example(s) have labels unseen in training (automne)" in r.stderr
    assert "accuracy" in r.stderr and "confusion" in r.stderr
    return out


@pytest.fixture(scope="module")
def translator(trained_run, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tr") / "run"
    r = invoke(
        "finetune",
        trained_run,
        "--task",
        "translate",
        "--data",
        data / "pairs.jsonl",
        "--out",
        out,
        "--steps",
        4,
        "--lora",
        "--lora-rank",
        2,
        "--merge",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().endswith("merged") and "with LoRA" in r.stderr and "chrF" in r.stderr
    return out


def test_classify_texts_and_files(classifier, data):
    r = invoke("classify", classifier, "Il fait chaud.", "La neige tombe.", "--top-k", 2)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("\tIl fait chaud.")
    label, p, other, q, _ = lines[0].split("\t")
    assert {label, other} == {"été", "hiver"} and float(p) >= float(q)
    r = invoke("classify", classifier, "--input", data / "train.jsonl", "--field", "text", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 12 and all(abs(sum(x["probs"].values()) - 1) < 1e-4 for x in rows)


def test_eval_classifier_table_and_json(classifier, data):
    r = invoke("eval", classifier, data / "dev.jsonl")
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.stdout and "macro-F1" in r.stdout and "confusion" in r.stdout
    assert "left out (automne)" in r.stderr
    report = json.loads(invoke("eval", classifier, data / "dev.jsonl", "--json").stdout)
    assert report["examples"] == 6 and 0 <= report["accuracy"] <= 1 and report["unseen"] == {"automne": 1}


def test_classifier_checkpoint_encodes(classifier, tmp_path):
    src = tmp_path / "items.txt"
    src.write_text("un\ndeux\n")
    r = invoke("encode", classifier, src, "-o", tmp_path / "v.npy")
    assert r.exit_code == 0, r.output


def test_csv_columns(trained_run, data, tmp_path):
    r = invoke(
        "finetune",
        trained_run,
        "--task",
        "classify",
        "--data",
        data / "train.csv",
        "--text-field",
        "phrase",
        "--label-field",
        "saison",
        "--out",
        tmp_path / "csv",
        "--steps",
        2,
        "--pooling",
        "mean",
        "--class-weights",
        "balanced",
        "--freeze-trunk",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    assert "held out of" in r.stderr and "training 66 parameters" in r.stderr


def test_translate_generate_and_eval(translator, data):
    from llmkit.core.config import SampleConfig
    from llmkit.core.decoding.steps import decode_batch
    from llmkit.core.store.checkpoint import load_model
    from llmkit.core.text.examples import encode_prompt

    r = invoke("generate", translator / "merged", "-n", 6, "--json", input="le chat dort\nle roi dort\n")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["prompt"] for x in rows] == ["le chat dort", "le roi dort"]
    model, ckpt = load_model(translator / "merged")
    ids = encode_prompt(ckpt.tokenizer, ckpt.task.prompt_template, [("user", "le chat dort")])
    want = decode_batch(
        model,
        [ids],
        SampleConfig(max_new_tokens=6, temperature=0.0),
        eos_id=ckpt.tokenizer.eos_id,
        decode=ckpt.tokenizer.decode,
    )[0].text
    assert rows[0]["text"] == want  # the template applied, greedy by default for a translator
    raw = invoke("generate", translator / "merged", "-n", 6, "--raw", "--greedy", "-p", "le chat dort")
    assert raw.stdout.startswith("le chat dort")  # --raw: a plain continuation of the text
    report = json.loads(invoke("eval", translator, data / "pairs.jsonl", "--json").stdout)
    assert {"chrf", "bleu", "loss"} <= set(report) and report["examples"] == 6


def test_instruct_messages_and_eval(trained_run, data, tmp_path):
    out = tmp_path / "chat"
    r = invoke(
        "finetune",
        trained_run,
        "--task",
        "instruct",
        "--data",
        data / "chat.jsonl",
        "--val",
        data / "chat.jsonl",
        "--out",
        out,
        "--steps",
        2,
        "--template",
        "Q: {prompt}\nR: ",
        "--set",
        "task.max_new_tokens=8",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    assert "template: 'Q: {prompt}\\nR: '" in r.stderr
    report = json.loads(invoke("eval", out, data / "chat.jsonl", "--json").stdout)
    assert {"exact_match", "token_f1"} <= set(report)


def test_continued_pretraining_and_lm_eval(trained_run, corpus_file, tmp_path):
    r = invoke(
        "finetune",
        trained_run,
        "--task",
        "lm",
        "--data",
        corpus_file,
        "--out",
        tmp_path / "lm",
        "--steps",
        2,
        "--set",
        "train.eval_batches=2",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    report = json.loads(invoke("eval", tmp_path / "lm", corpus_file, "--json").stdout)
    assert report["task"] == "lm" and report["bits_per_byte"] > 0 and report["perplexity"] > 1


def _bad(trained_run, tmp_path, rows_or_text, *extra, name="bad.jsonl"):
    f = tmp_path / name
    f.write_text(
        rows_or_text
        if isinstance(rows_or_text, str)
        else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_or_text)
    )
    return invoke(
        "finetune",
        trained_run,
        "--data",
        f,
        "--out",
        tmp_path / "o",
        "--steps",
        2,
        *FAST,
        *(extra or ("--task", "classify")),
    )


def test_bad_training_data(trained_run, tmp_path):
    assert_one_line_error(
        _bad(trained_run, tmp_path, [{"text": "a", "label": "x"}, {"text": "b"}]),
        "bad.jsonl: line 2 has no field 'label' (choose it with --label-field)",
    )
    assert_one_line_error(_bad(trained_run, tmp_path, [{"texte": "a", "label": "x"}]), "line 1 has no field 'text'")
    assert_one_line_error(
        _bad(trained_run, tmp_path, [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]), "only one class ('x')"
    )
    assert_one_line_error(
        _bad(trained_run, tmp_path, '{"text": "a", "label": "x"}\n{"text": "b", label}\n'),
        "bad.jsonl: line 2 is not valid JSON",
    )
    assert_one_line_error(_bad(trained_run, tmp_path, "a,b\n", name="bad.parquet"), "unknown format '.parquet'")
    assert_one_line_error(
        _bad(trained_run, tmp_path, [{"prompt": "a"}], "--task", "instruct"), "line 1 has no field 'response'"
    )
    assert not (tmp_path / "o").exists()  # a run that fails before training leaves nothing behind


def test_blank_rows_and_long_examples_are_counted(trained_run, tmp_path):
    rows = [{"text": t, "label": "été"} for t in SUMMER] + [{"text": t, "label": "hiver"} for t in WINTER]
    rows += [{"text": "  ", "label": "été"}, {"text": "mot " * 200, "label": "hiver"}]
    r = _bad(trained_run, tmp_path, rows)
    assert r.exit_code == 0, r.output
    assert "skipped 1 blank row(s)" in r.stderr and "1 example(s) longer than the context were truncated" in r.stderr


def test_bad_options(trained_run, classifier, data, tmp_path):
    train = data / "train.jsonl"
    assert_one_line_error(
        invoke("finetune", trained_run, "--data", train, "--out", tmp_path / "a"), "--task is required"
    )
    assert_one_line_error(
        invoke("finetune", trained_run, "--task", "classify", "--data", train, "--merge", "--out", tmp_path / "b"),
        "--merge folds LoRA adapters",
    )
    assert_one_line_error(
        invoke(
            "finetune", trained_run, "--task", "instruct", "--data", train, "--freeze-trunk", "--out", tmp_path / "c"
        ),
        "--freeze-trunk trains a classification head only",
    )
    assert_one_line_error(
        invoke("finetune", trained_run, "--task", "summarize", "--data", train, "--out", tmp_path / "d"),
        "task.kind: must be one of",
    )
    assert_one_line_error(
        invoke("finetune", trained_run, "--task", "instruct", "--data", train, "--out", classifier, "--resume", "auto"),
        "--task instruct does not match",
    )


def test_wrong_kind_of_checkpoint(trained_run, classifier):
    assert_one_line_error(
        invoke("generate", classifier, "-p", "x"), "is a classify checkpoint, not a language model: use llmkit classify"
    )
    assert_one_line_error(
        invoke("classify", trained_run, "x"), "is a lm checkpoint, not a classifier: use llmkit generate"
    )


def test_resume_from_a_checkpoint_with_another_tokenizer(trained_run, data, tmp_path, corpus_file):
    other = tmp_path / "other"
    r = invoke(
        "pretrain",
        corpus_file,
        "--out",
        other,
        "--steps",
        1,
        *[a for s in TINY_SETS for a in ("--set", s)],
        "--set",
        "tokenizer.vocab_size=420",
        "--set",
        "train.samples=0",
    )
    assert r.exit_code == 0, r.output
    assert_one_line_error(
        invoke(
            "finetune",
            trained_run,
            "--task",
            "lm",
            "--data",
            corpus_file,
            "--out",
            tmp_path / "x",
            "--resume",
            other / "last",
        ),
        "does not match the checkpoint's: vocab_size",
    )


def test_an_epoch_budget_says_so_when_it_stops(trained_run, data, tmp_path):
    """`finetune --epochs 20` ended with "stopped at step 60: step budget reached"."""
    args = ["finetune", trained_run, "--task", "classify", "--data", data / "train.jsonl", "--val",
            data / "dev.jsonl", *FAST, "--set", "train.eval_every=100"]  # fmt: skip
    r = invoke(*args, "--epochs", 1, "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert "1 epoch done (" in r.stderr and "step budget reached" not in r.stderr, r.stderr
    r = invoke(*args, "--epochs", 5, "--steps", 1, "--out", tmp_path / "s")  # the steps come first: said as such
    assert r.exit_code == 0, r.output
    assert "stopped at step 1: step budget reached" in r.stderr, r.stderr


def test_eval_streams_outputs_resumes_and_takes_several_files(translator, data, tmp_path):
    """A translator's eval writes each output as it is decoded; stopped half-way (here: the file
    cut after two lines and a torn third), it continues without decoding those again, and ends
    with the same scores and outputs as one uninterrupted run. Several files: together and apart."""
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "a.jsonl", rows[:4])
    write_jsonl(tmp_path / "b.jsonl", rows[4:])
    files = (tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    whole = invoke("eval", translator, *files, "--json", "--outputs", tmp_path / "whole.jsonl", "--batch-size", 2)
    assert whole.exit_code == 0, whole.output
    report = json.loads(whole.stdout)
    assert report["examples"] == 6 and report["resumed"] == 0
    assert {f["examples"] for f in report["per_file"].values()} == {4, 2}
    streamed = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in streamed) == list(range(6))
    assert {r["file"] for r in streamed} == {str(f) for f in files}
    assert all(r["output"] == report["outputs"][r["index"]]["output"] for r in streamed)
    assert "decoded 6/6" in whole.stderr
    # stopped after two outputs, the third line torn by the stop
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    (tmp_path / "part.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    again = invoke("eval", translator, *files, "--json", "--outputs", tmp_path / "part.jsonl", "--resume")
    assert again.exit_code == 0, again.output
    resumed = json.loads(again.stdout)
    assert resumed["resumed"] == 2 and resumed["chrf"] == report["chrf"] and resumed["outputs"] == report["outputs"]
    assert len((tmp_path / "part.jsonl").read_text().splitlines()) == 6
    # an existing file is never overwritten, and one from other examples is refused
    assert_one_line_error(invoke("eval", translator, *files, "--outputs", tmp_path / "part.jsonl"), "--resume")
    other = invoke("eval", translator, tmp_path / "b.jsonl", "--outputs", tmp_path / "part.jsonl", "--resume")
    assert_one_line_error(other, "another example")
    assert_one_line_error(invoke("eval", translator, *files, "--resume"), "--outputs")


def test_split_keeps_groups_whole_and_is_the_same_every_time(tmp_path):
    rows = [{"title": f"article {i // 3}", "question": f"q{i}", "answer": f"a{i}"} for i in range(30)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    r = invoke("split", tmp_path / "qa.jsonl", "--dev", "20%", "--test", 3, "--by", "title", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    sides = {
        s: [json.loads(x) for x in (tmp_path / "a" / f"qa.{s}.jsonl").read_text().splitlines()]
        for s in ("train", "dev", "test")
    }
    assert sum(map(len, sides.values())) == 30 and len(sides["dev"]) == 6 and len(sides["test"]) == 3
    titles = [{row["title"] for row in side} for side in sides.values()]
    assert not (titles[0] & titles[1]) and not (titles[0] & titles[2]) and not (titles[1] & titles[2])
    again = invoke("split", tmp_path / "qa.jsonl", "--dev", "20%", "--test", 3, "--by", "title", "-o", tmp_path / "b")
    assert again.exit_code == 0
    assert (tmp_path / "a" / "qa.dev.jsonl").read_text() == (tmp_path / "b" / "qa.dev.jsonl").read_text()
    # CSV keeps its header; outputs are never overwritten; impossible sizes are one line
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"phrase {i},{i % 2}\n" for i in range(10)))
    assert invoke("split", tmp_path / "t.csv", "--dev", 2).exit_code == 0
    assert (tmp_path / "t.dev.csv").read_text().splitlines()[0] == "text,label"
    assert len((tmp_path / "t.train.csv").read_text().splitlines()) == 9
    assert_one_line_error(invoke("split", tmp_path / "t.csv", "--dev", 2), "exists")
    assert_one_line_error(invoke("split", tmp_path / "qa.jsonl", "--dev", 30, "-o", tmp_path / "c"), "nothing left")
    assert_one_line_error(invoke("split", tmp_path / "qa.jsonl", "--dev", "abc", "-o", tmp_path / "c"), "--dev")
    assert_one_line_error(invoke("split", tmp_path / "qa.jsonl", "--by", "nope", "-o", tmp_path / "c"), "nope")


def test_zero_shot_labels_are_scored_by_their_likelihood(trained_run, tmp_path):
    """`classify --labels` and `eval --labels` on a language model: each label's score is the sum of
    its tokens' log-probabilities after the prompt (checked against a full forward pass), divided
    by its characters or tokens; the best score is the answer."""
    import torch

    from llmkit.core.store.checkpoint import load_model
    from llmkit.core.tasks.zeroshot import label_scores

    model, ckpt = load_model(trained_run)
    tok, labels = ckpt.tokenizer, ["été", "hiver", "printemps"]
    texts = ["Il fait chaud.", "La neige."]  # short: the tiny model's context is 32 tokens
    template = "{text} Saison : {label}"
    got, cut = label_scores(model, tok, texts, labels, template=template, normalize="sum", device="cpu")
    assert cut == 0 and got.shape == (2, 3)
    for i, text in enumerate(texts):
        prompt = ([tok.bos_id] if tok.expects_bos else []) + tok.encode(f"{text} Saison :")
        for j, label in enumerate(labels):
            cont = tok.encode(" " + label)
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logp = model(ids[:, :-1])[0].float().log_softmax(-1)  # (T, V)
            want = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont))
            assert abs(got[i, j].item() - want) < 1e-4
    per_char, _ = label_scores(model, tok, texts, labels, template=template, normalize="char", device="cpu")
    assert torch.allclose(per_char, got / torch.tensor([3.0, 5.0, 9.0]))
    long = "Le soleil brille sur la plage et les enfants jouent dans les vagues tout l'après-midi. " * 3
    _, cut = label_scores(model, tok, [long], labels, template=template, device="cpu")
    assert cut == 1  # the prompt keeps its end (next to the label), and the scores still come
    # the CLI: the best-scored label, every label's probability; eval gives a classifier's report
    r = invoke("classify", trained_run, "--labels", ",".join(labels), "--template", template, "--json",
               "--normalize", "sum", *texts)  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["label"] for x in rows] == [labels[int(k)] for k in got.argmax(-1)]
    assert all(abs(sum(x["probs"].values()) - 1) < 1e-4 for x in rows)
    write_jsonl(tmp_path / "dev.jsonl", [{"text": t, "label": lab} for t, lab in zip(texts, ["été", "hiver"])])
    e = invoke("eval", trained_run, tmp_path / "dev.jsonl", "--labels", ",".join(labels), "--json")
    assert e.exit_code == 0, e.output
    report = json.loads(e.stdout)
    assert report["examples"] == 2 and "accuracy" in report and report["zero_shot"]["normalize"] == "sum"
    # refused in one line: one label, a template without {label} at its end, a classifier
    assert_one_line_error(invoke("classify", trained_run, "--labels", "été", "x"), "two different")
    bad = invoke("classify", trained_run, "--labels", "a,b", "--template", "{label}: {text}", "x")
    assert_one_line_error(bad, "{label}")
