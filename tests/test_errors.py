"""Every bad input of docs/errors.md, run for real: one line, the documented message, the exit code."""

from __future__ import annotations

import pytest
from errors_catalog import CASES, HERE, build_world, documented, run_case


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors") / "w"
    build_world(root)
    return root


@pytest.fixture(scope="module")
def doc():
    return documented((HERE.parent / "docs" / "errors.md").read_text(encoding="utf-8"))


def test_the_catalogue_is_large_and_documented(doc):
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
    missing = [c.name for c in CASES if c.name not in doc]
    assert not missing, f"not in docs/errors.md (run python tests/errors_catalog.py): {missing}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_documented_line(case, world, doc):
    code, message = run_case(case, world)
    assert not message.startswith("TRACEBACK"), message
    assert message.startswith("error:" if case.code == 1 else "Error:"), message
    assert code == case.code
    assert (code, message) == doc[case.name], "docs/errors.md says otherwise: run python tests/errors_catalog.py"
