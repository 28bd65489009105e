"""Hosting ``llmkit serve``: the listening socket, uvicorn in a thread, the engine on the main thread.

Why this way round: on a CPU, decoding ran much faster in the thread that loaded the model than
in a second one (the `small` shape at batch 1: 322-359 tokens/s against 182-202 here; the few-row
layout is taken in the main thread only, and MKL's products were slower in a second thread
anyway: docs/serve.md, "Speed"). The HTTP side does no torch work, so it is the one that moves
to a thread.

Signals come to the main thread only, so they are handled here as uvicorn would: SIGTERM or
Ctrl-C stops taking connections and lets the requests in flight finish (the engine keeps
decoding them); a second Ctrl-C drops them. The engine's loop ends when uvicorn has shut down.
"""

from __future__ import annotations

import signal
import socket
import threading

import uvicorn

from llmkit.core.errors import ConfigError
from llmkit.serve.api import Server, create_app


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or one line saying why not (before the model is loaded)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP by name: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that
    # say so, and with it on, a stream's first token waited 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(server: Server, sock: socket.socket, *, quiet: bool) -> None:
    """Serve on ``sock`` until SIGTERM or Ctrl-C; returns once the requests in flight are done."""
    config = uvicorn.Config(
        create_app(server), log_level="warning" if quiet else "info", timeout_graceful_shutdown=30, access_log=not quiet
    )
    web = uvicorn.Server(config)

    def on_signal(sig, _frame) -> None:
        if web.should_exit and sig == signal.SIGINT:
            web.force_exit = True  # a second Ctrl-C: do not wait for the requests in flight
        web.should_exit = True

    where = "{}:{}".format(*sock.getsockname()[:2])
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.engine.hosted = True  # the app's start-up then starts no engine thread
    http = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, name="llmkit-http", daemon=True)
    try:
        http.start()
        server.engine.run(until=lambda: not http.is_alive())
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not web.started:
        raise ConfigError(f"the server on {where} did not start (see the lines above)")
