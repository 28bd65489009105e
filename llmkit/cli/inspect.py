"""See how a model works on a text: its tokens, its attention, its surprise at each token, how its
prediction forms layer by layer (logit lens); or a map of embeddings.

Each view writes a picture into --out (PNG, or SVG with --format svg) and prints a short reading;
--json prints the numbers instead. The text comes from --text or --file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import DeviceOpt, JsonOpt, QuietOpt, opt


def inspect(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A checkpoint, run directory, model folder or .gguf (not needed for --embeddings).", show_default=False)] = None,
    text: Annotated[Optional[str], opt("The text to look at.", "--text", "-t")] = None,
    file: Annotated[Optional[Path], opt("Read the text from this file.", "--file")] = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="How the text is cut into tokens.")] = False,
    attention: Annotated[bool, typer.Option("--attention", help="Attention maps of every head (or --layer/--head).")] = False,
    layer: Annotated[Optional[int], opt("With --attention: this layer only.", "--layer")] = None,
    head: Annotated[Optional[int], opt("With --attention --layer: this head, large.", "--head")] = None,
    surprise: Annotated[bool, typer.Option("--surprise", help="Each token's probability and surprisal, with the alternatives.")] = False,
    logit_lens: Annotated[bool, typer.Option("--logit-lens", help="What each layer would predict at each position.")] = False,
    embeddings: Annotated[Optional[Path], opt("A 2-D map of these vectors (.npy from llmkit encode).", "--embeddings")] = None,
    labels: Annotated[Optional[Path], opt("With --embeddings: one label per line (or the JSONL items file and --label-field).", "--labels")] = None,
    label_field: Annotated[str, typer.Option("--label-field", help="The label's field when --labels is JSON lines.")] = "label",
    method: Annotated[str, typer.Option("--method", help="With --embeddings: pca, or umap (needs umap-learn).")] = "pca",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pictures.")] = Path("inspect"),
    fmt: Annotated[str, typer.Option("--format", help="png or svg.")] = "png",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    from llmkit.cli.render import err_console
    from llmkit.core import inspect as ins
    from llmkit.core.errors import ConfigError

    if fmt not in ("png", "svg"):
        raise ConfigError(f"--format must be png or svg, not {fmt!r}")
    if head is not None and layer is None:
        raise ConfigError("--head needs --layer")
    console = err_console()
    report: dict = {}
    pictures: list[Path] = []
    draw = None if json_out else _pictures()
    if embeddings is not None:
        import numpy as np

        from llmkit.core.errors import DataError

        try:
            vectors = np.load(embeddings, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{embeddings}: not a .npy array of vectors ({e})") from None
        m = ins.embedding_map(vectors, _labels(labels, label_field) if labels else None, method)
        report["embeddings"] = {"points": m.points.tolist(), "labels": m.labels, "explained": m.explained,
                                "neighbour_agreement": m.neighbour_agreement}
        if draw:
            pictures.append(draw.embedding_map(m, out / f"embeddings.{fmt}"))
        if not quiet and not json_out and m.neighbour_agreement is not None:
            console.print(f"nearest neighbour shares the label for {m.neighbour_agreement:.1%} of the "
                          f"{len(m.points)} items", highlight=False)
    views = tokens or attention or surprise or logit_lens
    if checkpoint is None:
        if views or embeddings is None:
            raise ConfigError("give a checkpoint (or only --embeddings)")
    else:
        if not views:
            tokens = attention = surprise = logit_lens = True  # no view named: all of them
        from llmkit.core.checkpoint import load_model, read_checkpoint
        from llmkit.core.device import pick_device

        body = _text(text, file)
        model, ckpt = load_model(read_checkpoint(checkpoint), pick_device(device or "auto"))
        tok = ckpt.tokenizer
        if attention or surprise or logit_lens:
            ins.model_ids(tok, body, model.cfg.context)  # a text too long is refused before any output
        if tokens:
            t = ins.tokens(tok, body)
            report["tokens"] = t.__dict__
            if draw:
                pictures.append(draw.tokens(t, out / f"tokens.{fmt}"))
            if not quiet and not json_out:
                console.print(f"tokens: {len(t.ids)} ({t.chars_per_token:.2f} characters each), "
                              f"{sum(t.byte_fallback)} byte-fallback: " + "|".join(t.pieces), highlight=False, markup=False)
        if attention:
            if layer is not None and not 0 <= layer < model.cfg.n_layer:
                raise ConfigError(f"--layer must be 0..{model.cfg.n_layer - 1}, not {layer}")
            if head is not None and not 0 <= head < model.cfg.n_head:
                raise ConfigError(f"--head must be 0..{model.cfg.n_head - 1}, not {head}")
            a = ins.attention(model, tok, body)
            report["attention"] = {"pieces": a.pieces, "heads": a.heads(),
                                   **({"weights": a.weights[layer].tolist()} if layer is not None else {})}
            if draw:
                name = "attention" + (f"-L{layer}" if layer is not None else "") + (f"H{head}" if head is not None else "")
                pictures.append(draw.attention(a, out / f"{name}.{fmt}", layer, head))
            if not quiet and not json_out:
                heads = a.heads()
                prev = min(heads, key=lambda x: abs(x["distance"] - 1) + x["entropy"] / 10)
                first = max(heads, key=lambda x: x["first"])
                console.print(f"attention: previous-token head L{prev['layer']} H{prev['head']} (mean distance "
                              f"{prev['distance']:.2f}); beginning-of-text head L{first['layer']} H{first['head']} "
                              f"({first['first']:.0%} of its attention on the first token)", highlight=False)
        if surprise:
            s = ins.surprise(model, tok, body)
            report["surprise"] = {**s.__dict__, "bits_mean": sum(s.bits) / len(s.bits)}
            if draw:
                pictures.append(draw.surprise(s, out / f"surprise.{fmt}"))
            if not quiet and not json_out:
                worst = sorted(range(len(s.bits)), key=lambda i: -s.bits[i])[:3]
                console.print(f"surprise: {sum(s.bits) / len(s.bits):.2f} bits per token; most surprising: "
                              + ", ".join(f"{s.pieces[i + 1]!r} ({s.bits[i]:.1f} bits; expected {s.top[i][0][0]!r})"
                                          for i in worst), highlight=False, markup=False)
        if logit_lens:
            lens = ins.logit_lens(model, tok, body)
            report["logit_lens"] = {"pieces": lens.pieces, "predicted": lens.predicted, "prob": lens.prob.tolist()}
            if draw:
                pictures.append(draw.logit_lens(lens, out / f"logit-lens.{fmt}"))
            if not quiet and not json_out:
                console.print("logit lens, last position: " + " → ".join(
                    f"{p[-1]!r}" for p in lens.predicted), highlight=False, markup=False)
    if json_out:
        typer.echo(json.dumps(report, ensure_ascii=False, default=_plain))
        return
    for p in pictures:
        typer.echo(str(p))


def _pictures():
    from llmkit.core import pictures

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
        from llmkit.core.corpus import read_text

        return read_text(file)
    return text


def _labels(path: Path, field: str) -> list[str]:
    from llmkit.core.corpus import read_text
    from llmkit.core.errors import DataError

    lines = [line for line in read_text(path).split("\n") if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        from llmkit.core.records import iter_objects

        out = []
        for n, obj in iter_objects(lines, str(path)):
            if field not in obj:
                raise DataError(f"{path}: line {n} has no field {field!r}; give --label-field")
            out.append(str(obj[field]))
        return out
    return lines
