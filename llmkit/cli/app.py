"""The ``llmkit`` command: a Typer app whose errors a user can cause become one line and exit 1.

Command modules import core inside their function bodies, so ``llmkit --help`` never imports
torch. ``LLMKIT_DEBUG=1`` shows the full traceback of any error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import typer
from typer.core import TyperGroup

from llmkit import __version__
from llmkit.cli.options import escape
from llmkit.core.errors import LlmkitError, Terminated
from llmkit.core.host.signals import deliver


def _fail(message: str, code: int = 1):
    from llmkit.cli.render import err_console

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: say which process failed
        message = escape(f"[rank {os.environ.get('RANK', '?')}] ") + message
    err_console().print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


ARGV: list[str] = []
"""The command line after the program name, as given: what ``--processes`` launches again."""


class LlmkitGroup(TyperGroup):
    """Turns LlmkitError (and OS errors on user paths) into one red line on stderr, exit code 1."""

    def parse_args(self, ctx, args):
        ARGV[:] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        if os.environ.get("LLMKIT_DEBUG"):
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            quiet_broken_pipe()
        except Terminated:
            _fail("terminated (SIGTERM)", 143)
        except LlmkitError as e:
            _fail(escape(str(e)))
        except OSError as e:
            _fail(escape(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)))
        except KeyboardInterrupt:
            _fail("interrupted", 130)


app = typer.Typer(
    cls=LlmkitGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="llmkit: from raw text to a working small language model.\n\n"
    "Train a tokenizer, pretrain a decoder-only transformer, fine-tune it (classify, instruct,\n"
    "translate), generate text, embed and search, and measure it.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """llmkit: from raw text to a working small language model."""
    from llmkit.cli.render import notice
    from llmkit.core import events

    events.listen(notice)  # core's notices outside a run (a first-use import) reach stderr


def _register() -> None:
    from llmkit.cli import (
        cache,
        classify,
        encode,
        eval,
        finetune,
        generate,
        inspect,
        interop,
        pretrain,
        report,
        serve,
        split,
        tokenize,
    )

    app.add_typer(tokenize.app, name="tokenize", help="Train a SentencePiece tokenizer; encode and decode text.")
    app.add_typer(cache.app, name="cache", help=cache.__doc__)
    app.command("pretrain", help=pretrain.__doc__)(pretrain.pretrain)
    app.command("finetune", help=finetune.__doc__)(finetune.finetune)
    app.command("generate", help=generate.__doc__)(generate.generate)
    app.command("encode", help=encode.__doc__)(encode.encode)
    app.command("classify", help=classify.__doc__)(classify.classify)
    app.command("eval", help=eval.__doc__)(eval.evaluate)
    app.command("split", help=split.__doc__)(split.split)
    app.command("import", help=interop.import_model.__doc__)(interop.import_model)
    app.command("export", help=interop.export_model.__doc__)(interop.export_model)
    app.command("serve", help=serve.__doc__)(serve.serve)
    app.command("inspect", help=inspect.__doc__)(inspect.inspect)
    app.command("report", help=report.__doc__)(report.report)


_register()


def quiet_broken_pipe() -> None:
    """The reader of stdout went away (``llmkit generate … | head``): end quietly, as ``cat`` does.

    stdout is pointed at /dev/null first, so the interpreter's final flush cannot fail again and
    print its own complaint; the exit code is the shell's for a process ended by SIGPIPE.
    """
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(128 + 13)


def _on_signal(signum, frame):
    deliver(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


def main() -> None:
    # SIGTERM is handled like Ctrl-C (a training run writes its checkpoint first), exit 143; both
    # wait for an optimizer update in progress to finish (core/host/signals.py).
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        app()
    except BrokenPipeError:  # pragma: no cover - raised outside a command's body
        quiet_broken_pipe()
    except KeyboardInterrupt:  # pragma: no cover - outside a command
        sys.exit(130)
