"""`--processes N`: a training command that launches torchrun for itself.

`llmkit pretrain … --processes 2` runs `python -m torch.distributed.run --standalone
--nproc_per_node=2 -m llmkit pretrain …` (the same arguments, less `--processes`), with each
process's CPU threads set to its share of the cores. torchrun stays the documented way for many
machines (docs/distributed.md); this is the one-machine shortcut.

What the user reads is llmkit's, not torchrun's: its start-up warnings and, when a rank fails, its
40-line ChildFailedError report (a Python traceback of the launcher) are held back; the failing
rank's own one-line error is already on stderr, and the launch ends with one line and exit code 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# torchrun's own lines: glog-style warnings (W1207 13:02:11.123 …), its star banners, its report.
_LAUNCHER_NOISE = re.compile(r"^[WEI]\d{4} \d\d:\d\d:\d\d|^\*{5}")
_REPORT = re.compile(r"^Traceback \(most recent call last\)|ChildFailedError|^=+$")


def strip_processes(argv: list[str]) -> list[str]:
    """The arguments without ``--processes N`` / ``--processes=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def launch(processes: int, argv: list[str]) -> int:
    """Run ``llmkit ARGV`` under torchrun with ``processes`` local processes; torchrun's exit code
    (0, or 1 after a rank failed). Worker output passes through; the launcher's noise does not."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // processes)))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd += ["-m", "llmkit", *strip_processes(argv)]
    debug = bool(os.environ.get("LLMKIT_DEBUG"))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    assert proc.stderr is not None
    in_report = False
    for line in proc.stderr:
        if not debug:
            in_report = in_report or bool(_REPORT.search(line))
            if in_report or _LAUNCHER_NOISE.search(line):
                continue
        sys.stderr.write(line)
        sys.stderr.flush()
    code = proc.wait()
    if code and not debug:
        sys.stderr.write(f"error: {processes} processes launched; a rank failed (its message is above)\n")
        return 1
    return code
