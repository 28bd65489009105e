"""Under torchrun on the CPU (gloo): 2 processes train like 1 with the same global batch, resume
exactly after a kill, shard with FSDP into an ordinary checkpoint, and fail with the failing
rank's message; `--processes N` launches torchrun itself, and two "nodes" on loopback train as
one. Each test launches real `torchrun` processes, so they are marked slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmkit.cli.app import app

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SETS = [
    "model.d_model=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.context=32",
    "model.dropout=0.0",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.save_every=3",
    "train.samples=0",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "train.dtype=fp32",
    "train.device=cpu",
]


def llmkit_cmd(nproc: int, *args) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "llmkit", *map(str, args)]


def run(nproc: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(llmkit_cmd(nproc, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def pretrain_args(out: Path, tok: Path, *extra) -> list:
    args = ["pretrain", "-o", out, "--tokenizer", tok, "--batch-size", 4, "--global-batch-size", 16, "-q"]
    for s in SETS:
        args += ["--set", s]
    return args + list(extra)  # after SETS: a later --set wins


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    r = CliRunner().invoke(
        app, ["tokenize", "train", str(ROOT / "llmkit" / "sample"), "-o", str(out), "--vocab-size", "400"]
    )
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def one_process(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    r = run(1, *pretrain_args(out, tok, "--steps", 6))
    assert r.returncode == 0, r.stderr
    return out


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (torchrun's workers do not
    share its process group, so killing the launcher alone would leave them training)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def weights(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name / "model.safetensors"))


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def losses(run_dir: Path) -> list[float]:
    import json

    return [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"event": "step"' in line
    ]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one(one_process, tok, tmp_path, strategy):
    out = tmp_path / strategy
    r = run(2, *pretrain_args(out, tok, "--steps", 6, "--strategy", strategy))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "best")  # rank 0 alone prints the result
    assert_close(weights(one_process), weights(out))
    assert losses(one_process) == pytest.approx(losses(out), abs=1e-5)
    # The sharded run's checkpoint is the ordinary single file, optimizer state included.
    a = load_file(str(one_process / "last" / "optimizer.safetensors"))
    b = load_file(str(out / "last" / "optimizer.safetensors"))
    assert_close(a, b, atol=1e-6)
    if strategy == "fsdp":
        g = CliRunner().invoke(app, ["generate", str(out), "-p", "La ville", "-n", "5", "--seed", "0"])
        assert g.exit_code == 0 and g.stdout.startswith("La ville"), g.output


def test_killed_and_resumed_matches_uninterrupted(tok, tmp_path):
    steps = [
        "--steps",
        240,
        "--set",
        "train.save_every=5",
        "--set",
        "train.eval_every=1000",
        "--set",
        "train.keep_checkpoints=0",
        "--set",
        "model.context=64",
        "--set",
        "model.d_model=64",
    ]
    straight = tmp_path / "straight"
    assert run(2, *pretrain_args(straight, tok, *steps)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        llmkit_cmd(2, *pretrain_args(killed, tok, *steps)),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not (killed / "step-000020").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step 20"
    kill_all(str(killed))  # torchrun and its workers, mid-run, without warning
    proc.wait()
    from llmkit.core.store.checkpoint import find_latest, read_state

    latest = find_latest(killed)
    assert latest is not None and 20 <= read_state(latest)["step"] < 240
    r = run(2, *pretrain_args(killed, tok, *steps, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    a, b = weights(straight), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same processes: bit for bit
    # One process continues a two-process run with the same global batch, to fp32 tolerance (over
    # a few steps: over hundreds, rounding differences grow as in any two runs that differ by one).
    r = run(1, *pretrain_args(tmp_path / "on-one", tok, *steps, "--resume", straight / "step-000230"))
    assert r.returncode == 0, r.stderr
    assert_close(a, weights(tmp_path / "on-one"))


def test_a_failing_rank_stops_the_job_with_its_message(tok, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(
        "import os, sys\n"
        "import llmkit.core.jobs.pretrain as p\n"
        "from llmkit.core.errors import DataError\n"
        "if os.environ['RANK'] == '1':\n"
        "    def broken(corpus, cfg):\n"
        "        raise DataError('cannot read the corpus on this node')\n"
        "    p.plan_sources = broken\n"
        "from llmkit.cli.app import main\n"
        "sys.argv = ['llmkit', *sys.argv[1:]]\n"
        "main()\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        *map(str, pretrain_args(tmp_path / "out", tok, "--steps", 50)),
    ]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "error: [rank 1] cannot read the corpus on this node" in r.stderr
    assert "Traceback" not in r.stderr.split("error: [rank 1]")[0]  # the rank's own message, one line
    assert time.time() - t0 < 120  # rank 0 does not wait forever at the barrier


def test_processes_launches_torchrun_itself(one_process, tok, tmp_path):
    """`--processes 2` is `torchrun --standalone --nproc_per_node=2 -m llmkit …`: the same run."""
    out = tmp_path / "self-launched"
    r = run(1, *pretrain_args(out, tok, "--steps", 6, "--processes", 2))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "best")
    assert_close(weights(one_process), weights(out))
    assert "Traceback" not in r.stderr and "W1" not in r.stderr  # none of torchrun's own lines


def test_processes_says_one_line_when_ranks_fail(tok, tmp_path):
    r = run(1, *pretrain_args(tmp_path / "out", tok, "--steps", 6, "--processes", 2, "--resume", tmp_path / "none"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert sorted(lines[:2]) == [f"error: [rank {i}] checkpoint not found: {tmp_path / 'none'}" for i in (0, 1)]
    assert lines[2:] == ["error: 2 processes launched; a rank failed (its message is above)"]  # no torchrun report
    under = subprocess.run(
        [sys.executable, "-m", "llmkit", *map(str, pretrain_args(tmp_path / "o2", tok, "--processes", 2))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WORLD_SIZE": "2"},
    )
    assert under.returncode == 1 and "under torchrun, leave it out" in under.stderr


def test_two_nodes_on_loopback_train_like_one(one_process, tok, tmp_path):
    """torchrun across machines, played by two launchers on this one: --nnodes 2, a node rank each,
    the first node's address and port as the meeting point."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two-nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "llmkit",
                *map(str, pretrain_args(out, tok, "--steps", 6)),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results
    assert results[0][0].strip() == str(out / "best")  # node 0 holds rank 0: it prints the result
    assert_close(weights(one_process), weights(out))
