"""``report.html``: a run on one self-contained page (no CDN, no script needed, works offline).

Read from the run directory alone: ``config.yaml``, ``reports.json`` (the data and tokenizer
reports the run wrote), the tokenizer's contract, ``metrics.jsonl`` and the checkpoints'
``trainer_state.json``. The page holds the settings, the tokenizer, the
curves (loss, perplexity and bits per byte, learning rate, gradient norm, throughput) drawn by
matplotlib as inline SVG, the task's metrics at every evaluation (with the last confusion matrix
for classifiers), the samples written at evaluations, the checkpoints, and a table with every
number of every logged event. Training rewrites it at each evaluation, so it can stay open in a
browser during a run. Without matplotlib the page has everything but the pictures.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from llmkit.core import events
from llmkit.core.atomic import atomic_write
from llmkit.core.store.metrics_log import MetricsLog, read_metrics

CSS = """body{font:15px/1.5 system-ui,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#1d1d1b;
background:#fafaf7}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dcdcd4}
table{border-collapse:collapse;font-size:13px;margin:.5rem 0}
td,th{border:1px solid #dcdcd4;padding:.2rem .5rem;text-align:right}
th{background:#eeeee8}td.l,th.l{text-align:left}.curves{display:flex;flex-wrap:wrap;gap:1rem}
.curves svg{max-width:100%;height:auto}
.scroll{max-height:30rem;overflow:auto}pre{white-space:pre-wrap;background:#f0f0ea;padding:.5rem}.muted{color:#6b6b66}"""


def _rows(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return read_metrics(path, repair=False) if path.is_file() else []


def _shown(sample: Any) -> str:
    """A sample as text: itself, or its JSON."""
    return sample if isinstance(sample, str) else json.dumps(sample, ensure_ascii=False)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_fmt(c)}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _curves(rows: list[dict[str, Any]]) -> str:
    """Inline SVG pictures of the curves, or a note when matplotlib is not installed."""
    try:
        import matplotlib  # optional dependency (the inspect extra)
    except ImportError:
        return (
            "<p class=\"muted\">pictures need matplotlib (pip install 'llmkit[inspect]'): "
            "the tables below hold every number</p>"
        )
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency (the inspect extra)

    steps = [r for r in rows if r.get("event") == "step"]
    evals = [r for r in rows if r.get("event") == "eval"]
    panels = [
        ("loss", [("train", steps, "loss"), ("validation", evals, "val_loss")]),
        ("perplexity", [("validation", evals, "val_ppl")]),
        ("bits per byte", [("validation", evals, "val_bpb")]),
        ("learning rate", [("lr", steps, "lr")]),
        ("gradient norm", [("grad norm", steps, "grad_norm")]),
        ("tokens per second", [("tokens/s", steps, "tokens_per_s")]),
    ]
    metric = evals[-1].get("metric") if evals else None
    if metric and metric != "val_loss":
        panels.insert(1, (metric, [("validation", evals, metric)]))
    out = []
    for title, series in panels:
        drawn = [(name, [(r["step"], r[key]) for r in data if _num(r.get(key))]) for name, data, key in series]
        drawn = [(name, pts) for name, pts in drawn if pts]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        for name, pts in drawn:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_title(title, loc="left")
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
        plt.close(fig)
        svg = buf.getvalue()
        svg = re.sub(r"<metadata>.*?</metadata>", "", svg[svg.index("<svg") :], flags=re.S)  # dates, licence URIs
        out.append(svg)
    return '<div class="curves">' + "".join(out) + "</div>"


LISTENS: dict[type[events.Event], str] = {
    **{kind: "not in metrics.jsonl" for kind, why in MetricsLog.LISTENS.items() if why.startswith("skipped")},
    events.Step: "the curves",
    events.Eval: "the evaluations (metrics, confusion matrix, samples) and curves",
    events.Stop: "the run's events",
    events.Resume: "the run's events",
    events.Save: "the run's events",
    events.ReportFailed: "the run's events, as a warning",
}
"""What the page shows of every kind of event (tests/test_events.py checks none is left out)."""
RUN_EVENTS = ("stop", "resume", "save", "report_failed")


def _run_events(rows: list[dict[str, Any]]) -> str:
    """Stops, resumes, checkpoints and failed pictures, in order: what happened to the run."""
    shown = [r for r in rows if r.get("event") in RUN_EVENTS]
    if not shown:
        return ""

    def line(r: dict[str, Any]) -> str:
        what = {
            "stop": f"stopped: {r.get('reason')}",
            "resume": f"resumed from {r.get('path')}",
            "save": f"saved {r.get('kind')} → {r.get('path')}",
            "report_failed": f"a picture could not be drawn: {r.get('error')}",
        }[r["event"]]
        mark = "<b>warning</b>: " if r["event"] == "report_failed" else ""
        return f"<li>step {html.escape(str(r.get('step', '')))}: {mark}{html.escape(what)}</li>"

    return "<h2>Run events</h2><ul>" + "".join(line(r) for r in shown) + "</ul>"


TOKENIZER_KEYS = ("backend", "vocab_size", "model_type", "byte_fallback", "normalization", "user_symbols",
                  "special_ids", "add_bos")  # fmt: skip
"""The tokenizer contract's keys the page shows."""


def render(run: Path) -> str:
    """The page of a run directory, section by section."""
    run = Path(run)
    rows = _rows(run)
    config_file = run / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    evals = [r for r in rows if r.get("event") == "eval"]
    parts = [
        _header(run, config, rows, evals),
        "<h2>Curves</h2>" + _curves(rows),
        _run_events(rows),
        _evaluations(evals),
        _samples_file(run),
        _reports(run),
        _tokenizer(run),
        _checkpoints(run),
        _settings(config),
        _every_number(rows),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _header(run: Path, config: dict, rows: list[dict[str, Any]], evals: list[dict[str, Any]]) -> str:
    kind = (config.get("task") or {}).get("kind", "lm")
    steps = sum(r.get("event") == "step" for r in rows)
    best = f"; best {html.escape(str(evals[-1].get('metric')))} {_fmt(evals[-1].get('best_score'))}" if evals else ""
    return (
        "<!doctype html><html lang='fr'><head><meta charset='utf-8'>"
        f"<title>{html.escape(run.name)} — llmkit report</title>"
        f"<link rel='icon' href='data:,'><style>{CSS}</style></head><body>\n"
        f"<h1>{html.escape(run.name)}</h1>\n"
        f"<p>task <b>{html.escape(kind)}</b>; {steps} logged steps, {len(evals)} evaluations{best}</p>"
    )


def _evaluations(evals: list[dict[str, Any]]) -> str:
    """Every evaluation's numbers, the last confusion matrix, the samples written at evaluations."""
    if not evals:
        return ""
    keys = sorted({k for r in evals for k, v in r.items() if _num(v) and k not in ("time", "step")})
    parts = [
        "<h2>Evaluations</h2><div class='scroll'>"
        + _table(["step", *keys], [[r["step"], *[r.get(k, "") for k in keys]] for r in evals])
        + "</div>"
    ]
    last = evals[-1]
    if isinstance(last.get("confusion"), list) and isinstance(last.get("labels"), list):
        labels = last["labels"]
        parts.append(
            "<h3>Confusion matrix, last evaluation (rows true, columns predicted)</h3>"
            + _table(["true \\ predicted", *labels], [[lab, *row] for lab, row in zip(labels, last["confusion"])])
        )
    samples = [(r["step"], s) for r in evals for s in (r.get("samples") or [])]
    if samples:
        parts.append(
            "<h2>Samples at each evaluation</h2>"
            + "".join(f"<p class='muted'>step {step}</p><pre>{html.escape(_shown(s))}</pre>" for step, s in samples)
        )
    return "\n".join(parts)


def _samples_file(run: Path) -> str:
    if not (run / "samples.txt").is_file():
        return ""
    return "<h2>Samples</h2><pre>" + html.escape((run / "samples.txt").read_text(encoding="utf-8")) + "</pre>"


def _reports(run: Path) -> str:
    """The data report and the tokenizer's (when the run trained one), from reports.json."""
    if not (run / "reports.json").is_file():
        return ""
    try:
        reports = json.loads((run / "reports.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # a damaged side file costs its section, not the page
        return f"<p class='muted'>reports.json cannot be read ({html.escape(str(e))})</p>"
    if not isinstance(reports, dict):
        return "<p class='muted'>reports.json holds no reports</p>"
    titles = {"data": "Data", "tokenizer": "Tokenizer report (trained for this run)"}
    parts = []
    for name, values in reports.items():
        if isinstance(values, dict):
            cells = [[k, v if _num(v) or isinstance(v, str) else json.dumps(v, ensure_ascii=False)]
                     for k, v in values.items()]  # fmt: skip
            parts.append(f"<h2>{html.escape(titles.get(name, name))}</h2>" + _table(["", "value"], cells))
    return "\n".join(parts)


def _tokenizer(run: Path) -> str:
    where = (run / "tokenizer" / "tokenizer.yaml", run / "best" / "tokenizer.yaml")
    tok_file = next((p for p in where if p.is_file()), None)
    if tok_file is None:
        return ""
    contract = yaml.safe_load(tok_file.read_text(encoding="utf-8")) or {}
    cells = [[k, json.dumps(v, ensure_ascii=False)] for k, v in contract.items() if k in TOKENIZER_KEYS]
    return "<h2>Tokenizer</h2>" + _table(["key", "value"], cells, left=2)


def _checkpoints(run: Path) -> str:
    rows = []
    for d in sorted(p for p in run.iterdir() if p.is_dir() and (p / "trainer_state.json").is_file()):
        st = json.loads((d / "trainer_state.json").read_text())
        rows.append([d.name, st.get("step"), st.get("tokens_seen"), st.get("best_score"), st.get("params")])
    if not rows:
        return ""
    return "<h2>Checkpoints</h2>" + _table(["directory", "step", "tokens seen", "best score", "parameters"], rows)


def _settings(config: dict) -> str:
    if not config:
        return ""
    return "<h2>Settings (config.yaml)</h2>" + "".join(
        f"<h3>{html.escape(section)}</h3>"
        + _table(["key", "value"], [[k, json.dumps(v, ensure_ascii=False)] for k, v in (values or {}).items()], left=2)
        for section, values in config.items()
    )


def _every_number(rows: list[dict[str, Any]]) -> str:
    every = sorted({k for r in rows for k, v in r.items() if _num(v) and k != "time"})
    return (
        "<h2>Every logged number (metrics.jsonl)</h2><div class='scroll'>"
        + _table(["event", *every], [[r.get("event"), *[r.get(k, "") for k in every]] for r in rows])
        + "</div>"
    )


def write_report(run: Path) -> Path:
    """Write ``run/report.html`` (atomically: a browser refreshing it never sees half a page)."""
    run = Path(run)
    out = run / "report.html"
    atomic_write(out, render(run))
    return out
