"""See how a model works on a text: its tokens, its attention, its surprise at each token, how its
prediction forms layer by layer (logit lens); or a map of embeddings.

Each view writes a picture into --out (PNG, or SVG with --format svg) and prints a short reading;
--json prints the numbers instead. The text comes from --text or --file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmkit.cli.options import DeviceOpt, JsonOpt, QuietOpt, opt


def inspect(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(
            help="A checkpoint, run directory, model folder or .gguf (not needed for --embeddings).", show_default=False
        ),
    ] = None,
    text: Annotated[Optional[str], opt("The text to look at.", "--text")] = None,
    file: Annotated[Optional[Path], opt("Read the text from this file.", "--file")] = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="How the text is cut into tokens.")] = False,
    attention: Annotated[
        bool, typer.Option("--attention", help="Attention maps of every head (or --layer/--head).")
    ] = False,
    layer: Annotated[Optional[int], opt("With --attention: this layer only.", "--layer")] = None,
    head: Annotated[Optional[int], opt("With --attention --layer: this head, large.", "--head")] = None,
    surprise: Annotated[
        bool, typer.Option("--surprise", help="Each token's probability and surprisal, with the alternatives.")
    ] = False,
    logit_lens: Annotated[
        bool, typer.Option("--logit-lens", help="What each layer would predict at each position.")
    ] = False,
    embeddings: Annotated[
        Optional[Path], opt("A 2-D map of these vectors (.npy from llmkit encode).", "--embeddings")
    ] = None,
    labels: Annotated[
        Optional[Path],
        opt("With --embeddings: one label per line (or the JSONL items file and --label-field).", "--labels"),
    ] = None,
    label_field: Annotated[
        str, typer.Option("--label-field", help="The label's field when --labels is JSON lines.")
    ] = "label",
    method: Annotated[
        str, typer.Option("--method", help="With --embeddings: pca, or umap (needs umap-learn).")
    ] = "pca",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pictures.")] = Path("inspect"),
    fmt: Annotated[str, typer.Option("--format", help="png or svg.")] = "png",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    from llmkit.cli.render import err_console
    from llmkit.core.errors import ConfigError

    if fmt not in ("png", "svg"):
        raise ConfigError(f"--format must be png or svg, not {fmt!r}")
    if head is not None and layer is None:
        raise ConfigError("--head needs --layer")
    console = err_console()
    page = Page(
        out,
        fmt,
        None if json_out else _pictures(),
        say=(lambda m: None) if quiet or json_out else (lambda m: console.print(m, highlight=False, markup=False)),
    )
    if embeddings is not None:
        _embedding_view(page, embeddings, _labels(labels, label_field) if labels else None, method)
    views = {"tokens": tokens, "attention": attention, "surprise": surprise, "logit_lens": logit_lens}
    if checkpoint is None:
        if any(views.values()) or embeddings is None:
            raise ConfigError("give a checkpoint (or only --embeddings)")
    else:
        if not any(views.values()):
            views = dict.fromkeys(views, True)  # no view named: all of them
        _model_views(page, checkpoint, _text(text, file), views, layer, head, device)
    if json_out:
        typer.echo(json.dumps(page.report, ensure_ascii=False, default=_plain))
        return
    for p in page.pictures:
        typer.echo(str(p))


@dataclass
class Page:
    """Where the views go: pictures drawn into ``out``, numbers into ``report``, a reading through ``say``."""

    out: Path
    fmt: str
    draw: Any
    """core.jobs.pictures, or None with --json."""
    say: Callable[[str], None]
    report: dict = field(default_factory=dict)
    pictures: list[Path] = field(default_factory=list)

    def picture(self, name: str, fn, *args) -> None:
        if self.draw:
            self.pictures.append(getattr(self.draw, fn)(*args[:1], self.out / f"{name}.{self.fmt}", *args[1:]))


def _embedding_view(page: Page, path: Path, labels: list[str] | None, method: str) -> None:
    from llmkit.core.jobs import introspect as ins

    m = ins.embedding_map(ins.load_vectors(path), labels, method)
    page.report["embeddings"] = {
        "points": m.points.tolist(),
        "labels": m.labels,
        "explained": m.explained,
        "neighbour_agreement": m.neighbour_agreement,
    }
    page.picture("embeddings", "embedding_map", m)
    if m.neighbour_agreement is not None:
        page.say(f"nearest neighbour shares the label for {m.neighbour_agreement:.1%} of the {len(m.points)} items")


def _model_views(
    page: Page,
    checkpoint: Path,
    body: str,
    views: dict[str, bool],
    layer: int | None,
    head: int | None,
    device: str | None,
) -> None:
    from llmkit.core.host.device import pick_device
    from llmkit.core.interop.resolve import open_model
    from llmkit.core.jobs import introspect as ins

    model, ckpt = open_model(checkpoint, pick_device(device or "auto"))
    tok = ckpt.tokenizer
    if views["attention"] or views["surprise"] or views["logit_lens"]:
        ins.model_ids(tok, body, model.cfg.context)  # a text too long is refused before any output
    if views["tokens"]:
        t = ins.tokens(tok, body)
        page.report["tokens"] = t.__dict__
        page.picture("tokens", "tokens", t)
        page.say(
            f"tokens: {len(t.ids)} ({t.chars_per_token:.2f} characters each), "
            f"{sum(t.byte_fallback)} byte-fallback: " + "|".join(t.pieces)
        )
    if views["attention"]:
        _attention_view(page, model, tok, body, layer, head)
    if views["surprise"]:
        s = ins.surprise(model, tok, body)
        page.report["surprise"] = {**s.__dict__, "bits_mean": sum(s.bits) / len(s.bits)}
        page.picture("surprise", "surprise", s)
        worst = sorted(range(len(s.bits)), key=lambda i: -s.bits[i])[:3]
        page.say(
            f"surprise: {sum(s.bits) / len(s.bits):.2f} bits per token; most surprising: "
            + ", ".join(f"{s.pieces[i + 1]!r} ({s.bits[i]:.1f} bits; expected {s.top[i][0][0]!r})" for i in worst)
        )
    if views["logit_lens"]:
        lens = ins.logit_lens(model, tok, body)
        page.report["logit_lens"] = {"pieces": lens.pieces, "predicted": lens.predicted, "prob": lens.prob.tolist()}
        page.picture("logit-lens", "logit_lens", lens)
        page.say("logit lens, last position: " + " → ".join(f"{p[-1]!r}" for p in lens.predicted))


def _attention_view(page: Page, model, tok, body: str, layer: int | None, head: int | None) -> None:
    from llmkit.core.errors import ConfigError
    from llmkit.core.jobs import introspect as ins

    if layer is not None and not 0 <= layer < model.cfg.n_layer:
        raise ConfigError(f"--layer must be 0..{model.cfg.n_layer - 1}, not {layer}")
    if head is not None and not 0 <= head < model.cfg.n_head:
        raise ConfigError(f"--head must be 0..{model.cfg.n_head - 1}, not {head}")
    a = ins.attention(model, tok, body)
    page.report["attention"] = {
        "pieces": a.pieces,
        "heads": a.heads(),
        **({"weights": a.weights[layer].tolist()} if layer is not None else {}),
    }
    name = "attention" + (f"-L{layer}" if layer is not None else "") + (f"H{head}" if head is not None else "")
    page.picture(name, "attention", a, layer, head)
    prev, first = ins.notable_heads(a)
    page.say(
        f"attention: previous-token head L{prev['layer']} H{prev['head']} (mean distance "
        f"{prev['distance']:.2f}); beginning-of-text head L{first['layer']} H{first['head']} "
        f"({first['first']:.0%} of its attention on the first token)"
    )


def _pictures():
    from llmkit.core.jobs import pictures

    pictures._plt()  # a missing matplotlib is said before any work
    return pictures


def _plain(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def _text(text: str | None, file: Path | None) -> str:
    from llmkit.core.errors import ConfigError

    if (text is None) == (file is None):
        raise ConfigError("give the text with --text or --file (one of them)")
    if file is not None:
        from llmkit.core.files.corpus import read_text

        return read_text(file)
    return text


def _labels(path: Path, field: str) -> list[str]:
    from llmkit.core.errors import DataError
    from llmkit.core.files.corpus import read_text

    lines = [line for line in read_text(path).split("\n") if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        from llmkit.core.files.records import iter_objects

        out = []
        for n, obj in iter_objects(lines, str(path)):
            if field not in obj:
                raise DataError(f"{path}: line {n} has no field {field!r}; give --label-field")
            out.append(str(obj[field]))
        return out
    return lines
