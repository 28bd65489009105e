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

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

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


class HeadersInTime(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for a request's headers: a connection that
    sends part of them and stalls is closed after ``seconds`` (uvicorn's keep-alive timeout stops
    at the first byte, and it has none for headers). The body's deadline is the routes' own."""

    seconds = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_due = self.loop.call_later(self.seconds, self._headers_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._headers_due is not None:
            self._headers_due.cancel()  # this request's headers are in
            self._headers_due = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._headers_due is None:
            self._headers_due = self.loop.call_later(self.seconds, self._headers_late)  # the next request's

    def connection_lost(self, exc) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._headers_due = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def run(server: Server, sock: socket.socket, *, quiet: bool) -> None:
    """Serve on ``sock`` until SIGTERM or Ctrl-C; returns once the requests in flight are done."""
    protocol = type("Headers", (HeadersInTime,), {"seconds": server.limits.body_seconds})
    config = uvicorn.Config(
        create_app(server),
        log_level="warning" if quiet else "info",
        timeout_graceful_shutdown=30,
        access_log=not quiet,
        http=protocol,
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
