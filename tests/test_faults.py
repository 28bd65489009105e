"""Fault injection: runs killed with SIGKILL at random moments (during steps, evaluations and
checkpoint writes), stopped by SIGTERM and SIGINT, and filling a real disk. Every interrupted run
is resumed to its end and must equal an uninterrupted one bit for bit: weights and optimizer state
(pretraining, LoRA fine-tuning), vectors (encode). Slow: CI runs it in its slow tier.

Each process runs one CPU thread (OMP_NUM_THREADS=1): exact resume is bit-exact for the same thread
count, since a different count changes the order of floating-point sums.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SETS
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

EXE = str(Path(sys.executable).parent / "llmkit")
SETS = [
    a
    for s in [
        *TINY_SETS,
        "model.dropout=0.1",
        "train.samples=0",
        "train.patience=0",
        "train.eval_every=50",
        "train.save_every=20",
        "train.log_every=10",
    ]
    for a in ("--set", s)
]
KILLS = 20
MOST_KILLS = 15
ITEMS = 40000
"""A faster machine may finish a job before every kill lands: at least this many must land mid-run."""


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], tmp: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env(tmp), timeout=900, **kw)


def kill_and_resume(args: list[str], tmp: Path, *, kills: int, delays: tuple[float, float], seed: int) -> dict:
    """Start ``args`` (which resume on their own), SIGKILL it after a random delay, again and again
    until ``kills`` kills have landed, then let it finish. Returns what happened."""
    rng = random.Random(seed)
    landed, finished_early, failures = 0, 0, []
    while landed < kills:
        proc = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp))
        try:
            proc.wait(timeout=rng.uniform(*delays))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            landed += 1
            continue
        out, err = proc.communicate()
        if proc.returncode != 0:  # a resume that fails (a torn checkpoint loaded, say) is the bug we hunt
            failures.append(err[-2000:])
            break
        finished_early += 1
        break
    final = run(args, tmp)
    return {"kills": landed, "finished_early": finished_early, "failures": failures, "final": final}


def same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def same_checkpoint(a: Path, b: Path) -> None:
    same_tensors(a / "model.safetensors", b / "model.safetensors")
    same_tensors(a / "optimizer.safetensors", b / "optimizer.safetensors")
    sa, sb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    assert sa["step"] == sb["step"] and sa["tokens_seen"] == sb["tokens_seen"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from llmkit.core.files.corpus import sample_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(p.read_text(encoding="utf-8") for p in sample_corpus()), encoding="utf-8")
    return path


def test_pretraining_killed_20_times_ends_bit_identical(tmp_path, corpus):
    args = lambda out: ["pretrain", str(corpus), "-o", str(out), "--steps", "4000", "--resume", "auto", "-q", *SETS]  # noqa: E731
    ref = run(args(tmp_path / "ref"), tmp_path)
    assert ref.returncode == 0, ref.stderr
    report = kill_and_resume(args(tmp_path / "run"), tmp_path, kills=KILLS, delays=(1.2, 3.2), seed=1)
    assert not report["failures"], report["failures"]
    assert report["kills"] == KILLS  # every kill landed mid-run
    assert report["final"].returncode == 0, report["final"].stderr
    same_checkpoint(tmp_path / "ref" / "last", tmp_path / "run" / "last")
    same_tensors(tmp_path / "ref" / "best" / "model.safetensors", tmp_path / "run" / "best" / "model.safetensors")
    assert not list((tmp_path / "run").glob("*.tmp"))  # no half-written checkpoint left behind
    assert not (tmp_path / ".run.llmkit-lock").exists()  # every stale lock was taken over, the last released


def test_lora_finetune_killed_20_times_ends_bit_identical(tmp_path, corpus):
    base = tmp_path / "base"
    assert run(["pretrain", str(corpus), "-o", str(base), "--steps", "40", "-q", *SETS], tmp_path).returncode == 0
    rng = random.Random(0)
    words = corpus.read_text(encoding="utf-8").split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(12)), "label": f"c{i % 3}"} for i in range(300)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")

    def args(out):
        return [
            "finetune",
            str(base),
            "--task",
            "classify",
            "--data",
            str(data),
            "-o",
            str(out),
            "--lora",
            "--steps",
            "5000",
            "--resume",
            "auto",
            "-q",
            *SETS,
            "--set",
            "lora.dropout=0.1",
            "--set",
            "train.eval_every=250",
        ]

    ref = run(args(tmp_path / "ref"), tmp_path)
    assert ref.returncode == 0, ref.stderr
    report = kill_and_resume(args(tmp_path / "run"), tmp_path, kills=KILLS, delays=(1.5, 3.5), seed=2)
    assert not report["failures"], report["failures"]
    assert report["kills"] >= MOST_KILLS, report
    assert report["final"].returncode == 0, report["final"].stderr
    same_checkpoint(tmp_path / "ref" / "last", tmp_path / "run" / "last")
    same_tensors(tmp_path / "ref" / "last" / "adapter.safetensors", tmp_path / "run" / "last" / "adapter.safetensors")


def test_encode_of_40000_lines_killed_20_times_ends_identical(tmp_path, corpus):
    model = tmp_path / "m"
    assert (
        run(
            [
                "pretrain",
                str(corpus),
                "-o",
                str(model),
                "--preset",
                "tiny",
                "--steps",
                "2",
                "-q",
                "--set",
                "train.samples=0",
            ],
            tmp_path,
        ).returncode
        == 0
    )
    rng = random.Random(3)
    sentences = [s.strip() for s in corpus.read_text(encoding="utf-8").replace("\n", " ").split(".") if len(s) > 20]
    items = tmp_path / "items.txt"
    items.write_text("\n".join(f"{rng.choice(sentences)}. ({i})" for i in range(ITEMS)) + "\n", encoding="utf-8")
    args = lambda out: ["encode", str(model), str(items), "-o", str(out), "--batch-size", "8", "-q"]  # noqa: E731
    ref = run(args(tmp_path / "ref.npy"), tmp_path)
    assert ref.returncode == 0, ref.stderr
    first = subprocess.Popen(
        [EXE, *args(tmp_path / "run.npy")], env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(2.5)
    first.kill()
    first.wait()
    report = kill_and_resume(
        [*args(tmp_path / "run.npy"), "--resume"], tmp_path, kills=KILLS - 1, delays=(1.5, 4.5), seed=3
    )
    assert not report["failures"], report["failures"]
    assert report["kills"] >= MOST_KILLS - 1, report
    assert report["final"].returncode == 0, report["final"].stderr
    assert np.array_equal(np.load(tmp_path / "ref.npy"), np.load(tmp_path / "run.npy"))
    meta = json.loads((tmp_path / "run.npy.meta.json").read_text())
    assert meta["rows_done"] == ITEMS
    ref_items = (tmp_path / "ref.npy.items.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "run.npy.items.jsonl").read_text(encoding="utf-8") == ref_items


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_writes_the_current_step_and_resume_is_exact(tmp_path, corpus, sig, code):
    def args(out):
        return [
            "pretrain",
            str(corpus),
            "-o",
            str(out),
            "--steps",
            "1500",
            "--resume",
            "auto",
            *SETS,
            "--set",
            "train.save_every=100000",
        ]

    ref = run(args(tmp_path / "ref"), tmp_path)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(
        [EXE, *args(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path)
    )
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count('"event": "step"') >= 12):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "continue with --resume auto" in err and "Traceback" not in err
    state = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
    # The step it had reached (at least the 120 logged), not a periodic checkpoint: there is none.
    assert 120 <= state["step"] < 1500
    resumed = run(args(tmp_path / "run"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    same_checkpoint(tmp_path / "ref" / "last", tmp_path / "run" / "last")


def test_a_full_disk_stops_in_one_line_and_keeps_every_checkpoint(tmp_path, corpus):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); test_reliability.py injects ENOSPC instead")
    try:
        out = disk / "run"
        r = run(
            [
                "pretrain",
                str(corpus),
                "-o",
                str(out),
                "--steps",
                "400",
                *SETS,
                "--set",
                "train.save_every=2",
                "--set",
                "train.keep_checkpoints=0",
            ],
            tmp_path,
        )
        assert r.returncode == 1, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in r.stderr
        from llmkit.core.store.checkpoint import is_checkpoint, load_model

        complete = [p for p in out.iterdir() if p.is_dir() and is_checkpoint(p)]
        assert len(complete) >= 2
        for ckpt in complete:
            load_model(ckpt)  # every checkpoint written before the disk filled still loads
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
