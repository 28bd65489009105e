"""Stopping on a signal without tearing the state a checkpoint will save.

Ctrl-C (SIGINT) and SIGTERM raise ``KeyboardInterrupt`` / ``errors.Terminated`` where the program
is, and the training loop turns either into a checkpoint and a clean stop. One place must not be
cut: the optimizer update (AdamW changes moments and weights tensor by tensor, and the step count
follows). Code in ``uninterruptible()`` finishes first; a signal that arrives meanwhile is raised
as soon as it ends. The front end installs ``deliver`` as the handler; without it (a library user)
Python's default Ctrl-C behaviour applies unchanged.

No torch here: the CLI installs the handlers before any heavy import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_depth = 0
_pending: BaseException | None = None


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """A section a signal may not cut: a signal arriving inside is raised when it ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc


def deliver(exc: BaseException) -> None:
    """Raise ``exc`` now, or at the end of the uninterruptible section in progress."""
    global _pending
    if _depth:
        _pending = _pending or exc
        return
    raise exc
