"""Bring pretrained models in, and send llmkit models out.

``llmkit import SRC -o CKPT`` writes a Hugging Face model folder or a .gguf file as an ordinary
llmkit checkpoint (every command also takes SRC directly: it is imported once, into the cache).
``llmkit export CKPT -o DEST --format hf|gguf`` writes a checkpoint for transformers (a folder
AutoModelForCausalLM and AutoTokenizer load) or for llama.cpp and Ollama (one .gguf file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import QuietOpt, opt


def import_model(
    src: Annotated[Path, typer.Argument(help="A Hugging Face model folder or a .gguf file.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The llmkit checkpoint to write.", show_default=False)],
    quiet: QuietOpt = False,
) -> None:
    """Import a pretrained model (Hugging Face folder or GGUF file) as an llmkit checkpoint."""
    import time

    from llmkit.cli.render import err_console
    from llmkit.core.errors import ConfigError
    from llmkit.core.interop.resolve import import_model as run_import
    from llmkit.core.interop.resolve import open_checkpoint

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists: choose a new directory")
    t0 = time.perf_counter()
    path = run_import(src, out)
    ckpt = open_checkpoint(path)
    if not quiet:
        m = ckpt.model_cfg
        err_console().print(
            f"imported {ckpt.state.get('architecture', '?')} from {src}: {m.n_layer} layers, width {m.d_model}, "
            f"{m.n_head}/{m.kv_heads} heads, vocabulary {m.vocab_size}, context {m.context}"
            f"{', chat template' if ckpt.tokenizer.chat_template else ''} ({time.perf_counter() - t0:.1f} s)",
            highlight=False,
        )
    typer.echo(str(path))


def export_model(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint or run directory.", show_default=False)],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="A folder (--format hf) or a .gguf file.", show_default=False)
    ],
    format: Annotated[str, typer.Option("--format", help="hf (transformers) or gguf (llama.cpp, Ollama).")] = "hf",
    quant: Annotated[Optional[str], opt("GGUF weights: f32, f16 or q8_0 [default: f16].", "--quant")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Export a checkpoint for transformers (--format hf) or llama.cpp / Ollama (--format gguf)."""
    from llmkit.cli.render import err_console
    from llmkit.core.errors import ConfigError
    from llmkit.core.interop.export import export
    from llmkit.core.interop.resolve import open_checkpoint

    if format not in ("hf", "gguf"):
        raise ConfigError(f"--format must be hf or gguf, not {format!r}")
    if quant is not None and format != "gguf":
        raise ConfigError("--quant applies to --format gguf")
    ckpt = open_checkpoint(checkpoint)
    path = export(ckpt, out, format=format, quant=quant or "f16")
    if not quiet:
        what = f"gguf ({quant or 'f16'})" if format == "gguf" else "a Hugging Face folder"
        err_console().print(f"exported {ckpt.path} as {what} → {path}", highlight=False)
    typer.echo(str(path))
