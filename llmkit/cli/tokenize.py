"""``llmkit tokenize``: train a SentencePiece tokenizer, encode and decode text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import ConfigOpt, JsonOpt, QuietOpt, SetOpt, default
from llmkit.core.config import TokenizerConfig
from llmkit.core.errors import ConfigError, DataError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

TokArg = Annotated[
    Path, typer.Argument(help="A tokenizer directory, a checkpoint or a run directory.", show_default=False)
]


def _read_stdin(what: str) -> str:
    if sys.stdin is None or (sys.stdin.isatty() if hasattr(sys.stdin, "isatty") else False):
        raise DataError(f"no {what} given: pass it as an argument or pipe it on stdin")
    return sys.stdin.read()


@app.command("train")
def train(
    corpus: Annotated[
        list[str],
        typer.Argument(
            help="Files, directories or globs: text, JSON lines or parquet (.gz/.zst too).",
            show_default=False,
            metavar="CORPUS",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for tokenizer.model and tokenizer.yaml.")],
    vocab_size: Annotated[
        Optional[int],
        typer.Option(
            help="Vocabulary size (reduced with a warning if too large)." + default(TokenizerConfig, "vocab_size"),
            show_default=False,
        ),
    ] = None,
    model_type: Annotated[
        Optional[str],
        typer.Option(help="bpe, unigram or char." + default(TokenizerConfig, "model_type"), show_default=False),
    ] = None,
    character_coverage: Annotated[
        Optional[float],
        typer.Option(
            help="Share of characters in the vocabulary." + default(TokenizerConfig, "character_coverage"),
            show_default=False,
        ),
    ] = None,
    user_symbols: Annotated[
        Optional[list[str]],
        typer.Option(
            "--user-symbols",
            help="Symbols kept whole (repeatable or comma-separated).",
            show_default=False,
            metavar="SYMBOLS",
        ),
    ] = None,
    text_field: Annotated[
        str, typer.Option("--text-field", help="The text's field in JSON lines, or column in parquet.")
    ] = "text",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a SentencePiece tokenizer on CORPUS (a seeded sample of its lines when it is big) and
    print its quality report."""
    from llmkit.cli.render import err_console, tokenizer_report_table
    from llmkit.core.config import resolve_run_config
    from llmkit.core.files.corpus import resolve_files
    from llmkit.core.text.tokenizer import train_on_files

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    symbols = tuple(s for item in (user_symbols or []) for s in item.split(",") if s)
    cfg = resolve_run_config(
        config_file=config,
        sets=set_ or [],
        flags={
            "tokenizer": {
                "vocab_size": vocab_size,
                "model_type": model_type,
                "character_coverage": character_coverage,
                "user_symbols": symbols or None,
            }
        },
    ).tokenizer
    files = resolve_files(corpus)
    console = err_console()
    with console.status("training tokenizer …") if console.is_terminal and not quiet else _null():
        tok, report = train_on_files(files, cfg, text_field=text_field)
    tok.save(out)
    if json_out:
        typer.echo(json.dumps({"path": str(out), **report.as_dict()}))
        return
    if not quiet:
        for w in report.warnings:
            console.print(f"[yellow]warning:[/] {w}", highlight=False)
        console.print(tokenizer_report_table(report.as_dict()))
    typer.echo(str(out))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@app.command("encode")
def encode(
    tokenizer: TokArg,
    text: Annotated[
        Optional[str], typer.Argument(help="Text to encode; '-' or nothing reads stdin.", show_default=False)
    ] = None,
    pieces: Annotated[bool, typer.Option("--pieces", help="Show the pieces (coloured) instead of ids.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Encode text into token ids (or show its pieces)."""
    from llmkit.core.text.tokenizer import Tokenizer

    tok = Tokenizer.find_in(tokenizer) or _pretrained_tokenizer(tokenizer)
    if text is None or text == "-":
        text = _read_stdin("text")
    ids = tok.encode(text)
    if json_out:
        typer.echo(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))
    elif pieces:
        from rich.console import Console
        from rich.text import Text

        shown = [tok.id_to_piece(i).replace("\n", "\\n").replace("\t", "\\t") for i in ids]
        if sys.stdout.isatty():  # colours tell the pieces apart
            text_out = Text()
            for n, piece in enumerate(shown):
                text_out.append(piece, style="black on " + ("cyan" if n % 2 else "yellow"))
            Console(highlight=False).print(text_out)
        else:  # piped: no colours, so a separator that no piece contains (tabs are escaped)
            typer.echo("\t".join(shown))
        Console(stderr=True).print(f"{len(ids)} tokens, {len(text)} characters", highlight=False)
    else:
        typer.echo(" ".join(map(str, ids)))


@app.command("decode")
def decode(
    tokenizer: TokArg,
    ids: Annotated[
        Optional[list[str]],
        typer.Argument(help="Token ids; nothing reads them from stdin.", show_default=False, metavar="ID"),
    ] = None,
) -> None:
    """Decode token ids (arguments or stdin, separated by spaces or commas) back into text."""
    from llmkit.core.text.tokenizer import Tokenizer

    tok = Tokenizer.find_in(tokenizer) or _pretrained_tokenizer(tokenizer)
    raw = " ".join(ids) if ids else _read_stdin("ids")
    values = []
    for item in raw.replace(",", " ").replace("[", " ").replace("]", " ").split():
        if not item.lstrip("-").isdigit() or not 0 <= int(item) < tok.vocab_size:
            raise DataError(f"not a token id of this tokenizer (0..{tok.vocab_size - 1}): {item!r}")
        values.append(int(item))
    text = tok.decode(values)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _pretrained_tokenizer(path: Path):
    """A pretrained model's tokenizer (a Hugging Face folder, a .gguf, imported once): this path
    loads torch, which a tokenizer directory or a checkpoint never needs."""
    from llmkit.core.interop.resolve import open_tokenizer

    return open_tokenizer(path)
