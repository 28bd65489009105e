"""Serve a checkpoint over HTTP with OpenAI's API: completions, chat (streaming), embeddings,
classification; a chat page at /.

Listens on 127.0.0.1 unless --host says otherwise. --api-key (or $LLMKIT_API_KEY) makes every
/v1/ route ask for "Authorization: Bearer KEY". Requests that arrive together with the same
settings are decoded in one batch (--max-batch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import DeviceOpt, QuietOpt, check_positive, check_quantize, opt


def serve(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint, run directory, model folder or .gguf.", show_default=False)
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    api_key: Annotated[
        Optional[str], opt("Require this bearer token on /v1/ routes (default: $LLMKIT_API_KEY).", "--api-key")
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests decoded together at most.")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="The most tokens one request may ask for.")] = 512,
    max_concurrent: Annotated[
        int, typer.Option("--max-concurrent", help="Requests in flight at most (then 429).")
    ] = 64,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body, in bytes.")] = 1 << 20,
    cors_origin: Annotated[
        Optional[list[str]],
        opt(
            "Let web pages of this origin call the server (repeatable) [default: none].",
            "--cors-origin",
            metavar="ORIGIN",
        ),
    ] = None,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout", help="Seconds a client may take to send its request's headers, then its body."
        ),
    ] = 30.0,
    quantize: Annotated[
        Optional[str], opt("int8: int8 weight-only linear layers (faster decoding; docs/generate.md).", "--quantize")
    ] = None,
    index: Annotated[
        Optional[Path],
        opt("Vectors written by llmkit encode (and their OUT.ann) that POST /v1/search searches.", "--index"),
    ] = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    from llmkit.cli.render import err_console
    from llmkit.core.errors import ConfigError
    from llmkit.core.host.device import pick_device

    check_positive(
        max_batch=max_batch, max_tokens=max_tokens, max_concurrent=max_concurrent, max_body=max_body,
        request_timeout=request_timeout,
    )  # fmt: skip
    check_quantize(quantize)
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, not {port}")
    try:
        from llmkit.serve import host as hosting
        from llmkit.serve.api import LOOPBACK, Limits, Server
    except ImportError as e:
        raise ConfigError(
            f"llmkit serve needs FastAPI and uvicorn: pip install 'llmkit[serve]' ({e.name} is missing)"
        ) from None
    key = api_key or os.environ.get("LLMKIT_API_KEY") or None
    server = Server(
        checkpoint,
        device=str(pick_device(device or "auto")),
        max_batch=max_batch,
        api_key=key,
        quantize=quantize,
        limits=Limits(
            max_tokens=max_tokens, max_concurrent=max_concurrent, max_body_bytes=max_body, body_seconds=request_timeout
        ),  # fmt: skip
        # A loopback server answers its own names only: a page reaching it through another (DNS rebinding) is refused.
        allowed_hosts=LOOPBACK if host in LOOPBACK else None,
        cors_origins=tuple(cors_origin or ()),
        index=index,
    )
    sock = hosting.listen(host, port)  # a port in use: one line, before anything is served
    console = err_console()
    if not quiet:
        shown = "[::1]" if host == "::1" else host
        console.print(
            f"serving [bold]{server.name}[/] ({server.kind}) on http://{shown}:{port}  "
            f"(chat page at /, OpenAI API at /v1/){'; API key required' if key else ''}",
            highlight=False,
        )
        if host not in ("127.0.0.1", "localhost", "::1") and not key:
            console.print("[yellow]warning:[/] listening beyond this machine without --api-key", highlight=False)
    # SIGTERM and Ctrl-C: stop taking connections and let the requests in flight finish.
    hosting.run(server, sock, quiet=quiet)
