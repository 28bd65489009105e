"""Automatic choices on a busy machine: the CLI run beside an artificial CPU load.

A laptop with a browser open is what a training job meets; the speed probe, which once trained a
throwaway copy of the model and compiled it cold, must cost seconds there and never more memory
than the run itself. Each case runs the same command twice under the same load: with the choices
fixed (fp32, no compilation: the reference) and with the defaults (the probe decides). Times here
are bounds a broken probe misses by minutes (it took 6 minutes and 12.6 GB), not benchmarks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shared

pytestmark = pytest.mark.slow

FIXED = ["--set", "train.dtype=fp32", "--set", "train.compile=false"]


class Load:
    """One busy process per core, at normal priority, for the duration of a ``with``."""

    def __enter__(self):
        spin = "while True: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def _run(args: list[str], out: Path, env: dict) -> tuple[float, float]:
    """(seconds from launch to the first logged training step, peak RSS in MB) of one CLI run."""
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", *args, "--out", str(out), "--quiet", "--set", "train.log_every=1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["event"] == "step")
    return first["time"] - start, usage.ru_maxrss / 1024


def _compare(args: list[str], tmp_path: Path, monkeypatch) -> dict:
    env = {**os.environ, "LLMKIT_CACHE": str(tmp_path / "cache")}  # no figure from a quiet earlier run
    with Load():
        fixed = _run(args + FIXED, tmp_path / "fixed", env)
        auto = _run(args, tmp_path / "auto", env)
    report = {"fixed_first_step_s": fixed[0], "fixed_peak_mb": fixed[1], "first_step_s": auto[0], "peak_mb": auto[1]}
    print(report)
    return report


def test_finetuning_smollm2_with_defaults_under_load(tmp_path, monkeypatch):
    gguf = shared("..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = shared("classify_fr", "sib200_topic_fr.train.jsonl").read_text(encoding="utf-8").splitlines()[:96]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    args = ["finetune", str(gguf), "--task", "classify", "--data", str(data), "--steps", "2"]
    got = _compare(args, tmp_path, monkeypatch)
    assert got["first_step_s"] <= 60
    assert got["peak_mb"] <= 2 * got["fixed_peak_mb"]


def test_pretraining_the_quick_start_model_with_defaults_under_load(tmp_path, monkeypatch):
    got = _compare(["pretrain", "--preset", "tiny", "--steps", "3"], tmp_path, monkeypatch)
    assert got["first_step_s"] <= 60
    assert got["peak_mb"] <= 2 * got["fixed_peak_mb"]


def test_sigterm_and_ctrl_c_stop_a_run_during_the_speed_probe(tmp_path):
    """The probe is ordinary work of the run's process: a signal during it ends the run at once
    with the signal's exit code (143, 130), no kill -9 needed. The probe is slowed down here (it
    signals when it starts, then times a long step) so the signal lands inside it."""
    script = tmp_path / "slow_probe.py"
    script.write_text(
        "import sys, time, pathlib, torch\n"
        "from llmkit.core.training import speed\n"
        "def slow(self, cfg, batch, mode):\n"
        f"    pathlib.Path({str(tmp_path / 'probing')!r}).touch()\n"
        "    end = time.time() + 120\n"
        "    while time.time() < end:\n"
        "        torch.randn(256, 256) @ torch.randn(256, 256)\n"
        "    return speed.Timing(1.0)\n"
        "speed.InPlace.__call__ = slow\n"
        "speed.cpu_has_native_bf16 = lambda: True  # two candidate modes: the probe runs on any CPU\n"
        "from llmkit.cli.app import main\n"
        "sys.argv = ['llmkit', *sys.argv[1:]]\n"
        "main()\n"
    )
    env = {**os.environ, "LLMKIT_CACHE": str(tmp_path / "cache")}
    for sig, code in ((15, 143), (2, 130)):
        (tmp_path / "probing").unlink(missing_ok=True)
        args = ["pretrain", "--preset", "tiny", "--steps", "3", "--out", str(tmp_path / f"run{sig}"), "--quiet"]
        proc = subprocess.Popen([sys.executable, str(script), *args], env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (tmp_path / "probing").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (tmp_path / "probing").exists(), proc.stderr.read() if proc.poll() is not None else "no probe"
        sent = time.time()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
        assert time.time() - sent < 10
