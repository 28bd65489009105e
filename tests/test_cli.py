"""Every command through CliRunner (happy and error paths), plus the installed entry point."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SETS, skip_or_fail
from typer.testing import CliRunner

from llmkit.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _sets(*extra):
    args = []
    for item in [*TINY_SETS, *extra]:
        args += ["--set", item]
    return args


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, *phrases, alone=True):
    """Exit 1, no traceback, the error on one line (alone on stderr unless progress came before it)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    err = lines[-1] if lines else ""
    assert err.startswith("error:"), result.stderr
    assert len(lines) == 1 or not alone, result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in err, err


@pytest.fixture
def run_dir(tmp_path, corpus_file):
    out = tmp_path / "run"
    result = invoke("pretrain", corpus_file, "-o", out, "--steps", 2, *_sets())
    assert result.exit_code == 0, result.output
    return out


# --- tokenize ---------------------------------------------------------------------------------


def test_tokenize_train_encode_decode(tmp_path, corpus_file):
    out = tmp_path / "tok"
    r = invoke("tokenize", "train", corpus_file, "-o", out, "--vocab-size", 400, "--user-symbols", "<sep>")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    assert "characters per token" in r.stderr and "exact round trip" in r.stderr
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.yaml").is_file()
    text = "Bonjour,\n    le monde <sep> !"
    ids = invoke("tokenize", "encode", out, text).stdout.strip()
    assert invoke("tokenize", "decode", out, *ids.split()).stdout == text + "\n"
    # stdin works both ways
    ids2 = invoke("tokenize", "encode", out, input=text).stdout.strip()
    assert ids2 == ids
    assert invoke("tokenize", "decode", out, input=ids).stdout == text + "\n"
    pieces = invoke("tokenize", "encode", out, "Bonjour", "--pieces")
    assert pieces.exit_code == 0 and "tokens" in pieces.stderr


def test_tokenize_errors(tmp_path, corpus_file):
    assert_one_line_error(
        invoke("tokenize", "train", tmp_path / "missing.txt", "-o", tmp_path / "t"), "corpus not found"
    )
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(invoke("tokenize", "train", corpus_file, "-o", afile), "is a file")
    assert_one_line_error(
        invoke("tokenize", "train", corpus_file, "-o", tmp_path / "t", "--model-type", "wordpiece"),
        "tokenizer.model_type",
    )
    assert_one_line_error(invoke("tokenize", "encode", tmp_path, "x"), "holds no tokenizer")
    invoke("tokenize", "train", corpus_file, "-o", tmp_path / "t", "--vocab-size", 400)
    assert_one_line_error(invoke("tokenize", "decode", tmp_path / "t", "12", "99999"), "not a token id")


# --- pretrain ---------------------------------------------------------------------------------


def test_pretrain_happy_path_and_generate(run_dir):
    assert (run_dir / "best" / "trainer_state.json").is_file()
    g = invoke("generate", run_dir, "--prompt", "La ville", "-n", 8, "--seed", 1)
    assert g.exit_code == 0, g.output
    assert g.stdout.startswith("La ville") and len(g.stdout) > len("La ville")
    assert g.stdout == invoke("generate", run_dir, "--prompt", "La ville", "-n", 8, "--seed", 1).stdout
    greedy = invoke("generate", run_dir / "last", "--prompt", "Le", "--greedy", "-n", 5)
    assert greedy.exit_code == 0, greedy.output
    # Greedy is the arg-max path: the same text whatever the seed, and the text core decodes.
    assert (
        greedy.stdout == invoke("generate", run_dir / "last", "--prompt", "Le", "--greedy", "-n", 5, "--seed", 7).stdout
    )
    from llmkit.core.config import SampleConfig
    from llmkit.core.decoding.steps import decode_batch
    from llmkit.core.store.checkpoint import load_model

    model, ckpt = load_model(run_dir / "last")
    tok = ckpt.tokenizer
    want = decode_batch(
        model, [tok.encode("Le")], SampleConfig(max_new_tokens=5, temperature=0), eos_id=tok.eos_id, decode=tok.decode
    )[0]
    assert greedy.stdout == "Le" + want.text + "\n"


def test_pretrain_without_corpus_uses_the_bundled_sample(tmp_path):
    r = invoke("pretrain", "-o", tmp_path / "r", "--steps", 1, *_sets(), "--set", "train.samples=0")
    assert r.exit_code == 0, r.output
    assert "bundled French sample" in r.stderr


def test_print_config(tmp_path):
    r = invoke("pretrain", "--preset", "small", "--steps", 9, "--set", "optim.lr=3e-4", "--print-config")
    assert r.exit_code == 0
    assert "steps: 9" in r.stdout and "lr: 0.0003" in r.stdout and "d_model: 384" in r.stdout


def test_resume_auto_continues_and_tokenizer_mismatch_is_named(tmp_path, corpus_file, run_dir):
    r = invoke("pretrain", corpus_file, "-o", run_dir, "--steps", 4, "--resume", "auto", *_sets())
    assert r.exit_code == 0, r.output
    assert "resuming" in r.stderr
    other = tmp_path / "tok"
    invoke("tokenize", "train", corpus_file, "-o", other, "--vocab-size", 380)
    r = invoke("pretrain", corpus_file, "-o", run_dir, "--steps", 6, "--resume", "auto", "--tokenizer", other, *_sets())
    assert_one_line_error(r, "vocab_size is 380")


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--steps", "0"], "--steps must be positive"),
        (["--steps", "-3"], "--steps must be positive"),
        (["--steps", "2", "--batch-size", "0"], "--batch-size must be positive"),
        (["--steps", "2", "--lr", "0"], "--lr must be positive"),
        (["--steps", "2", "--set", "model.n_layers=2"], "did you mean 'n_layer'"),
        (["--steps", "2", "--preset", "tinny"], "unknown preset 'tinny'"),
        (["--steps", "2", "--time", "forever"], "cannot read 'forever'"),
    ],
)
def test_pretrain_bad_flags(tmp_path, corpus_file, args, phrase):
    assert_one_line_error(invoke("pretrain", corpus_file, "-o", tmp_path / "r", *args), phrase)


def test_pretrain_bad_corpora(tmp_path):
    out = tmp_path / "r"
    assert_one_line_error(invoke("pretrain", tmp_path / "none.txt", "-o", out, "--steps", 1), "corpus not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_line_error(invoke("pretrain", empty, "-o", out, "--steps", 1, *_sets()), "corpus is empty")
    binary = tmp_path / "data.bin.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00")
    assert_one_line_error(invoke("pretrain", binary, "-o", out, "--steps", 1), "data.bin.txt", "byte offset 4")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"Bonjour, " + "été".encode("latin-1"))
    assert_one_line_error(
        invoke("pretrain", latin, "-o", out, "--steps", 1), "latin.txt", "not valid UTF-8 at byte offset 9"
    )
    small = tmp_path / "small.txt"
    small.write_text("Une ligne.\nDeux lignes.\n" * 3)
    assert_one_line_error(
        invoke("pretrain", small, "-o", out, "--steps", 1, *_sets("tokenizer.model_type=char", "model.context=256")),
        "corpus too small",
        alone=False,
    )
    assert not (out / "best").exists() and not (out / "last").exists()


def test_pretrain_bad_config_and_out(tmp_path, corpus_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    assert_one_line_error(invoke("pretrain", corpus_file, "-c", bad, "-o", tmp_path / "r"), "invalid YAML", "bad.yaml")
    afile = tmp_path / "afile"
    afile.write_text("")
    assert_one_line_error(invoke("pretrain", corpus_file, "-o", afile, "--steps", 1), "is a file")


def test_existing_run_without_resume_is_refused(corpus_file, run_dir):
    assert_one_line_error(invoke("pretrain", corpus_file, "-o", run_dir, "--steps", 2, *_sets()), "--resume auto")


# --- generate ---------------------------------------------------------------------------------


def test_generate_errors(tmp_path, run_dir):
    assert_one_line_error(invoke("generate", tmp_path / "nothing", "--prompt", "x"), "checkpoint not found")
    (run_dir / "last" / "model.safetensors").unlink()
    assert_one_line_error(invoke("generate", run_dir / "last", "--prompt", "x"), "missing model.safetensors")
    assert_one_line_error(invoke("generate", run_dir, "--prompt", "x", "--temperature", "-1"), "--temperature")


# --- the installed program --------------------------------------------------------------------


def _entry_point() -> str:
    exe = Path(sys.executable).parent / "llmkit"
    if not exe.exists():
        skip_or_fail("the llmkit console script is not installed in this environment")
    return str(exe)


def test_installed_entry_point_runs_and_fails_cleanly(tmp_path, corpus_file):
    env = {**os.environ, "LLMKIT_CACHE": str(tmp_path / "cache")}
    ok = subprocess.run(
        [_entry_point(), "pretrain", str(corpus_file), "-o", str(tmp_path / "r"), "--steps", "2", *_sets()],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("best")
    bad = subprocess.run(
        [_entry_point(), "generate", str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=60
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "checkpoint not found" in bad.stderr
    usage = subprocess.run([_entry_point(), "pretrain", "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom llmkit.cli.app import app\n"
        "for args in ([ '--help'], ['pretrain', '--help'], ['tokenize', '--help'], ['generate', '--help']):\n"
        "    r = CliRunner().invoke(app, args)\n    assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_core_never_imports_the_cli_typer_or_rich():
    offenders = []
    for path in (ROOT / "llmkit" / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("typer", "rich", "click") or name.startswith("llmkit.cli"):
                    offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders


def test_a_budget_without_preset_sizes_the_model(tmp_path):
    from llmkit.core.training import recipe

    quick = [
        "--set",
        "tokenizer.vocab_size=400",
        "--set",
        "train.samples=0",
        "--set",
        "train.report=false",
        "--set",
        "train.dtype=fp32",
        "--set",
        "train.compile=false",
        "--set",
        "train.eval_every=5",
    ]
    r = invoke("pretrain", "-o", tmp_path / "auto", "--time", "3s", *quick)
    assert r.exit_code == 0, r.output
    assert "sized to the budget" in r.stderr
    saved = (tmp_path / "auto" / "config.yaml").read_text()
    shape = recipe.LADDER[0]  # three seconds buy the smallest shape
    assert f"d_model: {shape.d_model}" in saved and f"n_layer: {shape.n_layer}" in saved
    # with the levers that paid on the recipe (docs/benchmarks.md, "Pretraining levers"), said aloud
    assert "optimizer: muon" in saved and "schedule: wsd" in saved and "mlp: relu2" in saved
    assert "trained with optim.optimizer=muon" in r.stderr
    # A token budget sizes too; a value the user set stays (an architecture option included); a
    # preset or a setting of the model's size turns it off.
    r = invoke("pretrain", "-o", tmp_path / "tok", "--tokens", "20k", "--lr", "0.0007", "--set", "model.mlp=relu2",
               *quick)  # fmt: skip
    assert r.exit_code == 0 and "sized to the budget" in r.stderr, r.output
    saved = (tmp_path / "tok" / "config.yaml").read_text()
    assert "lr: 0.0007" in saved and "mlp: relu2" in saved
    r = invoke("pretrain", "-o", tmp_path / "fixed", "--time", "2s", "--set", "model.d_model=64", *quick)
    assert r.exit_code == 0 and "sized to the budget" not in r.stderr
    assert "d_model: 64" in (tmp_path / "fixed" / "config.yaml").read_text()


def test_tokenize_encode_of_a_run_does_not_import_torch(trained_run):
    """`tokenize encode RUN word` took 4 s: it imported torch through the checkpoint module."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom llmkit.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['tokenize', 'encode', {str(trained_run)!r}, 'Bonjour'])\n"
        "assert r.exit_code == 0 and r.stdout.split(), r.output\n"
        f"r = CliRunner().invoke(app, ['tokenize', 'encode', {str(trained_run / 'best')!r}, 'Bonjour'])\n"
        "assert r.exit_code == 0 and r.stdout.split(), r.output\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
