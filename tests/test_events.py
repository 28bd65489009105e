"""Core's events are typed, and every kind core emits is heard by the CLI's view, the metrics log
and the report; a report that fails to draw is shown to the user."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from llmkit.cli.render import FinetuneView, PretrainView
from llmkit.core import events
from llmkit.core.jobs import report
from llmkit.core.store.metrics_log import MetricsLog, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _emitted() -> set[str]:
    """The event classes core builds anywhere (``events.Name(...)``)."""
    names = set()
    for path in (ROOT / "llmkit" / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "events"
            ):
                names.add(node.func.attr)
    return names - {"ignore", "notify", "listen"}


def test_every_event_core_emits_is_defined_once_with_named_fields():
    kinds = {cls.__name__: cls for cls in events.Event.__subclasses__()}
    assert _emitted() <= set(kinds), _emitted() - set(kinds)
    assert _emitted() == set(kinds), f"defined but never emitted: {set(kinds) - _emitted()}"
    assert len({cls.kind for cls in kinds.values()}) == len(kinds), "two classes share a kind"
    for cls in kinds.values():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert [f.name for f in dataclasses.fields(cls)], cls


@pytest.mark.parametrize(
    "listener",
    [PretrainView, FinetuneView, MetricsLog, report],
    ids=["PretrainView", "FinetuneView", "MetricsLog", "report"],
)
def test_every_kind_has_a_listener_in_the_view_the_metrics_log_and_the_report(listener):
    declared = listener.LISTENS
    missing = [cls.__name__ for cls in events.Event.__subclasses__() if cls not in declared]
    assert not missing, f"{listener.__name__} says nothing of {missing}"
    if listener in (PretrainView, FinetuneView):
        for cls, handler in declared.items():
            assert handler.startswith("skipped:") or callable(getattr(listener, handler, None)), (cls, handler)


def test_what_the_metrics_log_records_the_report_shows():
    for cls, why in MetricsLog.LISTENS.items():
        recorded = not why.startswith("skipped")
        assert recorded == (report.LISTENS[cls] != "not in metrics.jsonl"), cls.__name__


def test_a_field_renamed_by_a_producer_fails_where_the_event_is_built():
    with pytest.raises(TypeError):
        events.Stop(why="steps", step=3)  # the field is 'reason'


def test_a_failed_report_is_shown_in_the_view_logged_and_on_the_page(tmp_path, capsys):
    view = PretrainView(quiet=False, json_lines=False)
    view(events.ReportFailed(error="RuntimeError: no fonts"))
    err = capsys.readouterr().err
    assert "could not be drawn" in err and "no fonts" in err
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log(
        events.Step(
            step=1, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=64, elapsed_s=0.1, tokens_per_s=640.0, progress=0.5
        )
    )
    log(events.ReportFailed(error="RuntimeError: no fonts <b>"))
    log(events.Tick(step=1, elapsed_s=0.1, progress=0.5))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in rows] == ["step", "report_failed"]
    page = report.render(tmp_path)
    assert "could not be drawn: RuntimeError: no fonts &lt;b&gt;" in page


def test_json_lines_keep_their_shape(capsys):
    view = PretrainView(quiet=True, json_lines=True)
    view(events.Save(what="best", path="runs/x/best", step=4))
    ev = events.Eval(
        step=4,
        metrics={"val_loss": 1.5, "val_bpb": 2.0},
        best_val_loss=1.5,
        metric="val_loss",
        score=1.5,
        best_score=1.5,
        improved=True,
        tokens=10,
        elapsed_s=1.0,
    )
    view(ev)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == '{"event": "save", "kind": "best", "path": "runs/x/best", "step": 4}'
    assert '"val_loss": 1.5' in lines[1] and '"val_bpb": 2.0' in lines[1] and '"improved": true' in lines[1]
