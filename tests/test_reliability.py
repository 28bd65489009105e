"""Reliability that needs no killing: safe loading, full disks, locks, torn logs, long lines, and
property-based tests of config parsing, tokenizer round trips and the sampling functions."""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit.core.config import SampleConfig, TokenizerConfig, resolve_run_config
from llmkit.core.decoding.sampling import min_p_filter, pick, process_logits, top_k_filter, top_p_filter
from llmkit.core.errors import CheckpointError, ConfigError
from llmkit.core.jobs.pretrain import plan, pretrain
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.store.lock import run_lock
from llmkit.core.store.metrics_log import read_metrics
from llmkit.core.text.tokenizer import cut_long_line, train_tokenizer
from llmkit.core.training.distributed import Dist

ROOT = Path(__file__).resolve().parents[1]


def _run(out, corpus, steps=4, sets=(), resume=None, on_event=lambda event: None):
    cfg, resume_from = plan(
        out,
        resume=resume,
        preset=None,
        config_file=None,
        sets=[*TINY_SETS, f"train.steps={steps}", "train.samples=0", *sets],
        flags={},
    )
    return pretrain([str(corpus)], out, cfg, resume_from=resume_from, on_event=on_event)


# --- nothing is ever unpickled ----------------------------------------------------------------------


def test_no_pickle_torch_load_or_unsafe_yaml_anywhere_in_the_code():
    bad = []
    for path in [*ROOT.joinpath("llmkit").rglob("*.py"), *ROOT.joinpath("benchmarks").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle") for n in names):
                    bad.append(f"{path}:{node.lineno} imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr == "load" and owner in ("torch", "pickle"):
                    safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                    if not safe:
                        bad.append(f"{path}:{node.lineno} {owner}.load")
                if owner == "yaml" and node.func.attr in ("load", "load_all", "unsafe_load", "full_load"):
                    bad.append(f"{path}:{node.lineno} yaml.{node.func.attr} (use yaml.safe_load)")
    assert not bad, bad


# --- a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_earlier_checkpoints_stay_loadable(tmp_path, corpus_file, monkeypatch):
    out = tmp_path / "r"
    _run(out, corpus_file, steps=2)
    before = ckpt_io.read_state(out / "last")["step"]
    real = ckpt_io.save_file

    def full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # half the data lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(ckpt_io, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device; earlier checkpoints are intact; free some"):
        _run(out, corpus_file, steps=4, resume="auto")
    monkeypatch.setattr(ckpt_io, "save_file", real)
    assert not list(out.glob("*.tmp"))  # the half-written checkpoint is gone
    for ckpt in ("best", "last"):
        model, _ = ckpt_io.load_model(out / ckpt)  # every earlier checkpoint still loads
        assert model.num_params() > 0
    assert ckpt_io.read_state(out / "last")["step"] == before
    resumed = _run(out, corpus_file, steps=4, resume="auto")  # space is back: the run goes on
    assert resumed.state.step == 4


# --- one writer per run directory -------------------------------------------------------------------


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".run.llmkit-lock"
    import socket

    lock.write_text(
        json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "1", "since": "earlier"})
    )
    with run_lock(out, Dist()):  # the process that held it is gone: taken over
        assert json.loads(lock.read_text())["pid"] != int(dead.stdout)
        with pytest.raises(ConfigError, match="another llmkit run .* is writing to"):
            with run_lock(out, Dist()):  # a live holder (this very process) refuses a second writer
                pass
    assert not lock.exists()  # released on the way out


def test_the_lock_of_a_killed_process_not_yet_reaped_is_taken_over(tmp_path):
    """A SIGKILLed torchrun worker may linger as a zombie (nobody has reaped it yet): it answers
    kill(pid, 0) with its own start time, but it writes nothing, so its lock is stale."""
    import socket

    from llmkit.core.store.lock import _start_time

    zombie = subprocess.Popen(["sleep", "0"])
    for _ in range(200):  # it has exited; not waited for, it stays a zombie
        stat = Path(f"/proc/{zombie.pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break
        subprocess.run(["sleep", "0.02"])
    lock = tmp_path / ".run.llmkit-lock"
    lock.write_text(
        json.dumps(
            {"host": socket.gethostname(), "pid": zombie.pid, "started": _start_time(zombie.pid), "since": "earlier"}
        )
    )
    with run_lock(tmp_path / "run", Dist()):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    zombie.wait()


def test_two_concurrent_runs_on_one_directory(tmp_path, corpus_file):
    exe = str(Path(sys.executable).parent / "llmkit")
    out = tmp_path / "r"
    args = [
        exe,
        "pretrain",
        str(corpus_file),
        "-o",
        str(out),
        "--steps",
        "40",
        "-q",
        "--resume",
        "auto",
        *[a for s in TINY_SETS for a in ("--set", s)],
        "--set",
        "train.samples=0",
        "--set",
        "train.patience=0",
    ]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".r.llmkit-lock"
    for _ in range(600):
        if lock.exists() or first.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 1
    assert "another llmkit run" in second.stderr and "Traceback" not in second.stderr


# --- torn files -------------------------------------------------------------------------------------


def test_a_torn_last_line_of_metrics_is_repaired_on_resume(tmp_path, corpus_file):
    out = tmp_path / "r"
    _run(out, corpus_file, steps=2)
    log = out / "metrics.jsonl"
    intact = log.read_text()
    log.write_text(intact + '{"event": "step", "step": 3, "lo')  # killed while appending
    assert read_metrics(log) == [json.loads(line) for line in intact.splitlines()]
    resumed = _run(out, corpus_file, steps=4, resume="auto")
    assert resumed.state.step == 4
    rows = read_metrics(log)  # every line parses again: the torn one was cut, new ones appended
    assert [r["step"] for r in rows if r["event"] == "step"][-1] == 4


def test_lines_longer_than_the_trainer_accepts_are_cut_and_reported():
    line = " ".join(f"mot{i % 97} été" for i in range(3000))  # ~30 KB, one line
    tok, report = train_tokenizer([line], TokenizerConfig(vocab_size=300, max_sentence_length=2000), corpus_sha256="x")
    assert tok.vocab_size >= 280 and tok.decode(tok.encode(line)) == line  # it learnt pieces: it saw the text
    assert any("cut into pieces" in w for w in report.warnings)
    pieces = cut_long_line(line, 2000)
    assert "".join(pieces) == line and all(len(p.encode()) <= 2000 for p in pieces)


# --- property-based tests ---------------------------------------------------------------------------

KEYS = {
    "train.steps": st.integers(0, 10**6),
    "train.batch_size": st.integers(1, 4096),
    "optim.lr": st.floats(1e-8, 10, allow_nan=False),
    "model.dropout": st.floats(0, 0.99),
    "train.time": st.sampled_from(["", "90s", "10m", "1h30m", "2.5h"]),
    "lora.enabled": st.booleans(),
}


@given(
    st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), max_size=6).flatmap(
        lambda d: st.fixed_dictionaries({k: KEYS[k] for k in d})
    )
)
@settings(max_examples=80, deadline=None)
def test_set_overrides_parse_back_to_the_values_given(values):
    sets = [
        f"{k}={v!r}" if isinstance(v, float) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in values.items()
    ]
    cfg = resolve_run_config(sets=sets)
    for key, value in values.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        assert got == value or (isinstance(value, float) and math.isclose(got, value, rel_tol=1e-12))
    again = resolve_run_config(base=cfg.to_dict())  # a saved config reads back identical
    assert again == cfg


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
@settings(max_examples=60, deadline=None)
def test_a_setting_never_crashes_on_any_text(text):
    try:
        resolve_run_config(sets=[f"train.steps={text}"])
    except ConfigError:
        pass  # refused with a message: fine; anything else would be a crash


@given(st.text(max_size=200))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_tokenizer_round_trip_on_arbitrary_unicode(tokenizer, text):
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be UTF-8 at all
    assert tokenizer.decode(tokenizer.encode(text)) == text


logit_rows = st.lists(st.floats(-30, 30, allow_nan=False, allow_subnormal=False), min_size=2, max_size=40)


@given(logit_rows, st.floats(0.05, 3), st.integers(0, 10), st.floats(0.05, 1), st.floats(0, 1))
@settings(max_examples=150, deadline=None)
def test_filtered_tokens_are_never_sampled_and_the_rest_is_a_distribution(row, temp, k, p, min_p):
    logits = torch.tensor([row])
    cfg = SampleConfig(temperature=temp, top_k=k, top_p=p, min_p=min_p)
    processed = process_logits(logits, cfg)
    probs = torch.softmax(processed, dim=-1)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    kept = torch.isfinite(processed[0])
    scaled = logits[0] / temp  # the filters see the temperature-scaled scores (ties may appear there)
    assert kept[scaled == scaled.max()].any()  # a most likely token always survives every filter
    if k:  # top-k keeps the k largest, and any token tied with the k-th (as float32 sees them)
        values = scaled.tolist()
        kth = sorted(values, reverse=True)[min(k, len(values)) - 1]
        assert int(kept.sum()) <= sum(v >= kth for v in values)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert kept[int(pick(processed, temp, gen)[0])]


@given(logit_rows)
@settings(max_examples=50, deadline=None)
def test_each_filter_keeps_the_top_token(row):
    logits = torch.tensor([row])
    best = logits[0] == logits[0].max()
    for out in (top_k_filter(logits, 1), top_p_filter(logits, 1e-6), min_p_filter(logits, 1.0)):
        assert torch.isfinite(out[0][best]).any()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_logits_are_refused(bad):
    logits = torch.zeros(2, 8)
    logits[1, 3] = bad
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        process_logits(logits, SampleConfig())
    with pytest.raises(CheckpointError):
        process_logits(torch.full((1, 4), -math.inf), SampleConfig())


@pytest.mark.parametrize(
    "name", ["temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty"]
)
def test_sampling_settings_refuse_nan(name):
    with pytest.raises(ConfigError, match="finite"):
        SampleConfig(**{name: math.nan})


def test_checkpoint_files_are_world_readable(tmp_path, corpus_file):
    out = tmp_path / "r"
    _run(out, corpus_file, steps=2)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (out / "last").iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' 0600 no longer stands out
    shutil.rmtree(out)
