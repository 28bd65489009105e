"""`llmkit generate` through CliRunner: outputs, formats, knobs and bad input."""

import json

import pytest
from test_cli import assert_one_line_error
from typer.testing import CliRunner

from llmkit.cli.app import app

runner = CliRunner()


def gen(*args, input=None):
    return runner.invoke(app, ["generate", *[str(a) for a in args]], input=input)


def test_stream_one_prompt(trained_run):
    r = gen(trained_run, "--prompt", "La ville", "-n", 6, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("La ville") and r.stdout.endswith("\n")
    assert "tokens/s" in r.stderr


def test_json_many_prompts_from_a_file_and_num_samples(trained_run, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Le pain\n\nLa mer\nUne ville\n")
    r = gen(trained_run, "--prompt-file", f, "--json", "-n", 5, "--num-samples", 2, "--seed", 1, "--batch-size", 3)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["prompt"], x["sample"]) for x in rows] == [
        (p, s) for p in ("Le pain", "La mer", "Une ville") for s in (0, 1)
    ]
    assert all(x["finish_reason"] in ("eos", "length", "stop") and x["tokens"] <= 5 for x in rows)
    # batching does not change outputs: the same prompts one at a time give the same texts
    r1 = gen(trained_run, "--prompt-file", f, "--json", "-n", 5, "--num-samples", 2, "--seed", 1, "--batch-size", 1)
    assert [json.loads(line)["text"] for line in r1.stdout.splitlines()] == [x["text"] for x in rows]


def test_jsonl_prompts_and_stdin(trained_run, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"q": "Le pain"}\n{"q": "La mer"}\n')
    r = gen(trained_run, "--prompt-file", f, "--field", "q", "--greedy", "-n", 3, "--json")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["prompt"] for x in r.stdout.splitlines()] == ["Le pain", "La mer"]
    r = gen(trained_run, "--greedy", "-n", 3, "--json", input="Le pain\nLa mer\n")
    assert [json.loads(x)["prompt"] for x in r.stdout.splitlines()] == ["Le pain", "La mer"]


def test_show_probs_and_beams_and_penalties(trained_run):
    r = gen(trained_run, "--prompt", "Le", "-n", 4, "--greedy", "--show-probs")
    assert r.exit_code == 0 and "token probabilities" in r.stdout and "top alternatives" in r.stdout
    r = gen(trained_run, "--prompt", "Le", "-n", 6, "--num-beams", 3, "--length-penalty", 0.8, "--json")
    assert r.exit_code == 0, r.output
    assert "score" in json.loads(r.stdout)
    r = gen(
        trained_run,
        "--prompt",
        "Le",
        "-n",
        8,
        "--repetition-penalty",
        1.3,
        "--no-repeat-ngram",
        2,
        "--presence-penalty",
        0.5,
        "--frequency-penalty",
        0.5,
        "--top-p",
        0.9,
        "--min-p",
        0.05,
        "--seed",
        0,
    )
    assert r.exit_code == 0, r.output


def test_stop_string_cuts_the_output(trained_run):
    full = json.loads(gen(trained_run, "--prompt", "Le", "-n", 30, "--greedy", "--json").stdout)["text"]
    assert len(full) > 4
    stop = full[2:4]
    cut = json.loads(gen(trained_run, "--prompt", "Le", "-n", 30, "--greedy", "--json", "--stop", stop).stdout)
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"


def test_interactive_loop_reads_until_eof(trained_run):
    r = gen(trained_run, "--interactive", "-n", 4, "--greedy", input="Bonjour\nLa ville\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("> ") == 3  # two prompts answered, the third read meets end of input


def test_long_prompt_warns_once_and_keeps_its_end(trained_run):
    r = gen(trained_run, "--prompt", "Le pain et le vin. " * 40, "-n", 3, "--greedy")
    assert r.exit_code == 0
    assert r.stderr.count("longer than the context") == 1


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--temperature", "-0.5"], "--temperature: must be in [0, 100]"),
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k: must be in [0, 1048576]"),
        (["--num-beams", "0"], "--num-beams: must be in [1, 64]"),
        (["--num-beams", "3", "--top-k", "5"], "cannot be combined with --top-k"),
        (["--num-beams", "3", "--temperature", "0.7"], "cannot be combined with --temperature"),
    ],
)
def test_bad_flags(trained_run, args, phrase):
    assert_one_line_error(gen(trained_run, "--prompt", "x", *args), phrase)


def test_bad_prompt_files(trained_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(gen(trained_run, "--prompt-file", empty), "no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    assert_one_line_error(gen(trained_run, "--prompt-file", bad), "line 2 is not valid JSON")
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert_one_line_error(gen(trained_run, "--prompt-file", missing), "line 2 has no field 'prompt'")
