"""One writer per run directory: a lock file beside it that names its holder.

The lock (``runs/.NAME.llmkit-lock``) records host, PID and the process's start time (from
``/proc``), so a PID reused after a crash is not mistaken for the old run. A lock file rather than
``flock``: it survives on network filesystems where ``flock`` is unreliable, and it says who holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from llmkit.core.errors import ConfigError
from llmkit.core.training.distributed import Dist


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the PID it
    names one process, even after the PID is reused. None where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a killed process waiting to be reaped (a zombie) still answers kill(0): it writes nothing
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


@contextlib.contextmanager
def run_lock(out: Path, dist: Dist) -> Iterator[None]:
    """One writer per run directory: a second run on the same ``--out`` is refused while the first
    lives. The lock (``.NAME.llmkit-lock`` beside the directory) records host, PID and the process's
    start time; a lock whose process is gone (killed, crashed) is stale and taken over. Under
    torchrun, rank 0 holds it for the job."""
    if not dist.is_main:
        yield
        return
    out = Path(out).resolve()  # the real path: an alias (a symbolic link) of a run is the same run
    lock = out.parent / f".{out.name}.llmkit-lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
            except (OSError, ValueError):
                held = {}  # torn while being written: its writer died at once
            same_host = held.get("host") == me["host"]
            if held and (not same_host or _alive(int(held.get("pid", 0)), held.get("started"))):
                where = f"PID {held.get('pid')}" + ("" if same_host else f" on host {held.get('host')}")
                hint = "" if same_host else f" (if that run is gone, delete {lock})"
                raise ConfigError(
                    f"another llmkit run ({where}, since {held.get('since')}) is writing to {out}: "
                    f"wait for it to end, or choose another --out{hint}"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:  # pragma: no cover - another process took the stale lock between our two tries
        raise ConfigError(f"another llmkit run just started writing to {out}: choose another --out")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
