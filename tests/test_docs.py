"""The docs' examples still print what the docs show, and none of them writes into the checkout."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_examples  # noqa: E402 - a script beside the tests, not a package

OUTPUT = re.compile(r"(?:-o|--out|>)\s+([\w./-]+)(?=\s|$)", re.M)


def test_the_docs_have_examples_with_outputs():
    found = docs_examples.examples()
    assert len(found) >= 6 and sum(e.cheap for e in found) >= 3
    assert all(e.output is not None for e in found), [e.name for e in found if e.output is None]


def test_doc_examples_write_only_into_runs():
    """A reader who runs a page's commands in a checkout writes only under runs/ (ignored by git)."""
    for e in docs_examples.examples():
        for target in OUTPUT.findall(e.commands):
            if target.replace(".", "").isdigit():
                continue  # a comparison in an inline script, not a file
            assert target.startswith("runs/") or target.startswith("/dev/"), f"{e.page.name}: {e.name} writes {target}"
        if e.pictures:
            assert e.pictures[0].startswith("runs/"), e.name


def test_numbers_are_compared_with_a_tolerance_and_words_exactly():
    assert docs_examples.same("loss 2.340, 13 tokens\n", "loss 2.351, 13 tokens\n")
    assert not docs_examples.same("loss 2.340\n", "loss 2.9\n")
    assert not docs_examples.same("expected ' de'\n", "expected ' le'\n")
    assert not docs_examples.same("a 1\n", "a 1 2\n")


@pytest.mark.slow
def test_cheap_doc_examples_print_what_the_docs_show(capsys):
    """Trains the docs' model (the quick start's, fp32, one thread) in a scratch folder, runs every
    example marked cheap and compares its output with the page's."""
    rc = docs_examples.main(["--cheap"])
    out = capsys.readouterr()
    assert rc == 0, out.err + out.out
