"""report.html: a run on one self-contained page, written by training itself."""

from __future__ import annotations

import json
import re

import pytest
from conftest import need_module
from test_cli import _sets, invoke


def _numbers(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, sorted(
        {
            k
            for r in rows
            for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time"
        }
    )


def test_training_writes_a_report_with_every_logged_number(tmp_path, corpus_file):
    need_module("matplotlib", "the report's curves")
    run = tmp_path / "run"
    r = invoke("pretrain", corpus_file, "-o", run, "--steps", 6, *_sets("train.report=true"))
    assert r.exit_code == 0, r.stderr
    page = (run / "report.html").read_text(encoding="utf-8")
    rows, keys = _numbers(run)
    assert all(f">{k}<" in page for k in keys)  # a column for every metric of metrics.jsonl
    from llmkit.core.jobs.report import _fmt

    for row in rows:  # and every value
        for k in keys:
            if k in row:
                assert f">{_fmt(row[k])}<" in page, (k, row[k])
    assert page.count("<svg") >= 4  # loss, perplexity, bits per byte, learning rate, …: inline pictures
    assert not re.search(r"""(src|href)=["']https?:""", page)  # nothing fetched: it works offline
    assert "step-000006" in page and "best" in page and "vocab_size" in page
    assert "<h2>Data</h2>" in page and "train_tokens" in page and "chars_per_token" in page  # data, tokenizer


def test_a_classifier_report_shows_its_confusion_matrix(tmp_path, trained_run):
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    out = tmp_path / "clf"
    r = invoke(
        "finetune",
        trained_run,
        "--task",
        "classify",
        "--data",
        data / "avis.train.jsonl",
        "--val",
        data / "avis.dev.jsonl",
        "--steps",
        4,
        "-o",
        out,
        "--quiet",
        "--set",
        "train.eval_every=2",
    )
    assert r.exit_code == 0, r.stderr
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Confusion matrix" in page and "macro_f1" in page and "positif" in page
    assert "<h2>Data</h2>" in page and "labels" in page


def test_the_report_command_and_its_one_line_error(tmp_path, corpus_file):
    run = tmp_path / "run"
    assert invoke("pretrain", corpus_file, "-o", run, "--steps", 2, *_sets()).exit_code == 0
    assert not (run / "report.html").exists()  # train.report=false in the tests' settings
    r = invoke("report", run)
    assert r.exit_code == 0 and r.stdout.strip() == str(run / "report.html")
    r = invoke("report", tmp_path)
    assert r.exit_code == 1 and "is not a run directory (no metrics.jsonl)" in r.stderr


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(tmp_path, corpus_file):
    need_module("matplotlib", "the report's curves")
    from browser import Browser, find_chromium
    from conftest import skip_or_fail

    exe = find_chromium()
    if exe is None:
        skip_or_fail("no chromium here (apt-get install chromium; .ci/run installs it)")
    run = tmp_path / "run"
    assert invoke("pretrain", corpus_file, "-o", run, "--steps", 8, *_sets("train.report=true")).exit_code == 0
    browser = Browser(exe, height=900)
    try:
        browser.open((run / "report.html").as_uri())
        browser.wait_for(
            "document.readyState === 'complete' && document.querySelectorAll('svg').length >= 4", timeout=30
        )
        assert browser.eval("document.querySelector('h1').textContent") == "run"
        browser.screenshot(tmp_path / "report.png")
        assert not browser.errors, browser.errors
    finally:
        browser.close()
