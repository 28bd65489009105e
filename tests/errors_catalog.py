"""The catalogue of bad inputs: every case a user can cause, the command that causes it, and the
exit code. ``tests/test_errors.py`` runs each case and checks that its one-line message is the one
``docs/errors.md`` documents; ``python tests/errors_catalog.py`` rewrites that page from real runs.

Cases run in a scratch directory (the current directory during the case) holding:
    corpus.txt            a small French corpus
    run/                  a tiny pretrained run (best/, last/, tokenizer/)
    hf/                   run/ exported as a Hugging Face folder
    clf/                  a classifier fine-tuned from run/
    tok2/                 another tokenizer (another vocabulary)
and whatever a case's ``setup`` writes. Paths in messages are therefore short and stable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import TINY_SETS  # noqa: E402

SETS = [a for s in TINY_SETS for a in ("--set", s)]


@dataclass
class Case:
    name: str
    command: str
    args: list[str]
    code: int = 1
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    hide: tuple[str, ...] = ()
    """Optional packages the case runs without (as if they were not installed)."""


# --- setups: what a case breaks before it runs ------------------------------------------------------


def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text, encoding="utf-8")

    return setup


_HELD: list[socket.socket] = []


def hold_port(port: int) -> Callable[[Path], None]:
    """Listen on 127.0.0.1:port for the rest of the process (a port in use; if something else
    holds it already, it is in use all the same)."""

    def setup(root: Path) -> None:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            _HELD.append(sock)
        except OSError:
            sock.close()

    return setup


def copy_run(dest: str, then: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        shutil.rmtree(root / dest, ignore_errors=True)
        shutil.copytree(root / "run", root / dest)
        then(root / dest)

    return setup


def swap_tokenizer(run: Path) -> None:
    for name in ("tokenizer.model", "tokenizer.yaml"):
        for ckpt in ("best", "last"):
            shutil.copy(run.parent / "tok2" / name, run / ckpt / name)


def edit_width(run: Path) -> None:
    for ckpt in ("best", "last"):
        p = run / ckpt / "config.yaml"
        p.write_text(p.read_text().replace("d_model: 32", "d_model: 48"))


def newer(file: str, key: str) -> Callable[[Path], None]:
    def then(run: Path) -> None:
        p = run / "best" / file
        if file.endswith(".json"):
            d = json.loads(p.read_text())
            d[key] = 99
            p.write_text(json.dumps(d))
        else:
            p.write_text(p.read_text().replace("format: 1", "format: 99"))

    return then


def break_optimizer(content: bytes) -> Callable[[Path], None]:
    def then(run: Path) -> None:
        for ckpt in sorted(run.glob("step-*")) + [run / "last"]:
            if (ckpt / "optimizer.safetensors").exists():
                (ckpt / "optimizer.safetensors").unlink()
                (ckpt / "optimizer.safetensors").write_bytes(content)

    return then


def damage_metrics(run: Path) -> None:
    p = run / "metrics.jsonl"
    lines = p.read_text().splitlines()
    lines[1] = lines[1][:10]
    p.write_text("\n".join(lines) + "\n")


def drop_file(name: str) -> Callable[[Path], None]:
    def then(run: Path) -> None:
        (run / "best" / name).unlink()

    return then


def live_lock(root: Path) -> None:
    started = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (root / ".busy.llmkit-lock").write_text(
        json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "since": "2026-11-29 10:00:00"}
        )
    )


def other_model_index(root: Path) -> None:
    from typer.testing import CliRunner

    from llmkit.cli.app import app

    (root / "items.txt").write_text("une ligne\nune autre ligne\n")
    r = CliRunner().invoke(app, ["encode", "clf", "items.txt", "-o", "clf_index.npy", "-q"])
    assert r.exit_code == 0, r.output


def index_made(root: Path) -> None:
    from typer.testing import CliRunner

    from llmkit.cli.app import app

    (root / "items.txt").write_text("une ligne\nune autre ligne\n")
    r = CliRunner().invoke(app, ["encode", "run", "items.txt", "-o", "index.npy", "-q"])
    assert r.exit_code == 0, r.output


def _zst_frames() -> bytes:
    """A corpus compressed in two frames (how parallel compressors and appended files write it)."""
    import zstandard

    c = zstandard.ZstdCompressor()
    return c.compress("Une première trame de texte.\n".encode() * 300) + c.compress(b"La seconde.\n" * 300)


def hf_copy(
    name: str, change, *, index: bool = False, pickle: bool = False, link: bool = False
) -> Callable[[Path], None]:
    """A copy of the exported Hugging Face folder ``hf/``, its config changed or its weights broken."""

    def setup(root: Path) -> None:
        dest = root / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(root / "hf", dest)
        if change:
            cfg = json.loads((dest / "config.json").read_text())
            change(cfg)
            (dest / "config.json").write_text(json.dumps(cfg))
        if index:
            (dest / "model.safetensors").rename(dest / "model-00001-of-00002.safetensors")
            (dest / "model.safetensors.index.json").write_text(
                json.dumps(
                    {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
                )
            )
        if pickle:
            (dest / "model.safetensors").unlink()
            (dest / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
        if link:
            (root / "secret.txt").write_text("private\n")
            (dest / "chat_template.jinja").symlink_to(root / "secret.txt")

    return setup


def truncated_gguf(root: Path) -> None:
    from typer.testing import CliRunner

    from llmkit.cli.app import app

    if not (root / "run.gguf").exists():
        r = CliRunner().invoke(app, ["export", "run", "-o", "run.gguf", "--format", "gguf", "-q"])
        assert r.exit_code == 0, r.output
    data = (root / "run.gguf").read_bytes()
    (root / "cut.gguf").write_bytes(data[: len(data) // 3])


PAIRS = "\n".join(json.dumps({"src": f"phrase {i}", "tgt": f"sentence {i}"}) for i in range(12))
REVIEWS = "\n".join(json.dumps({"text": f"avis {i}", "label": "bon" if i % 2 else "mauvais"}) for i in range(12))

CASES = [
    # pretrain: the corpus
    Case("corpus file missing", "pretrain", ["nowhere.txt", "-o", "out", "--steps", "1"]),
    Case("corpus empty", "pretrain", ["empty.txt", "-o", "out", "--steps", "1"], setup=write("empty.txt", "")),
    Case(
        "corpus binary",
        "pretrain",
        ["blob.txt", "-o", "out", "--steps", "1"],
        setup=write("blob.txt", b"\x00\x01\x02binary\x00" * 20),
    ),
    Case(
        "corpus not UTF-8",
        "pretrain",
        ["latin1.txt", "-o", "out", "--steps", "1"],
        setup=write("latin1.txt", "Un été à la mer.\n".encode("latin-1")),
    ),
    Case(
        "corpus smaller than one block",
        "pretrain",
        ["tiny.txt", "-o", "out", "--steps", "1", *SETS, "--set", "model.context=512", "--tokenizer", "run/tokenizer"],
        setup=write("tiny.txt", "Bonjour.\n"),
    ),
    Case(
        "JSON line without the text field",
        "pretrain",
        ["docs.jsonl", "-o", "out", "--steps", "1", "--tokenizer", "run/tokenizer"],
        setup=write("docs.jsonl", '{"text": "Un document."}\n{"titre": "Deux"}\n'),
    ),
    Case(
        "JSON line that is not JSON",
        "pretrain",
        ["docs2.jsonl", "-o", "out", "--steps", "1", "--tokenizer", "run/tokenizer"],
        setup=write("docs2.jsonl", '{"text": "Un document."}\n{"text": "coupé\n'),
    ),
    Case(
        "parquet without pyarrow",
        "pretrain",
        ["t.parquet", "-o", "out", "--steps", "1", "--tokenizer", "run/tokenizer"],
        setup=write("t.parquet", b"PAR1"),
        hide=("pyarrow", "pyarrow.parquet"),
    ),
    Case(
        "damaged gzip corpus",
        "pretrain",
        ["cut.txt.gz", "-o", "out", "--steps", "1", "--tokenizer", "run/tokenizer"],
        setup=write("cut.txt.gz", __import__("gzip").compress(b"Bonjour.\n" * 500)[:-30]),
    ),
    Case(
        "--mix weights that do not sum to 1",
        "pretrain",
        ["--mix", "corpus.txt=0.5", "--mix", "run=0.3", "-o", "out", "--steps", "1"],
    ),
    Case("--mix without a weight", "pretrain", ["--mix", "corpus.txt", "-o", "out", "--steps", "1"]),
    Case(
        "--mix and a corpus argument", "pretrain", ["corpus.txt", "--mix", "corpus.txt=1", "-o", "out", "--steps", "1"]
    ),
    Case(
        "a --mix source that is empty",
        "pretrain",
        ["--mix", "corpus.txt=0.5", "--mix", "blank.txt=0.5", "-o", "out", "--steps", "1"],
        setup=write("blank.txt", "  \n\n"),
    ),
    # pretrain: settings
    Case("unknown config key", "pretrain", ["corpus.txt", "-o", "out", "--set", "train.stpes=5"]),
    Case("value of the wrong type", "pretrain", ["corpus.txt", "-o", "out", "--set", "model.n_layer=abc"]),
    Case("NaN in a setting", "pretrain", ["corpus.txt", "-o", "out", "--set", "optim.lr=nan"]),
    Case("--set without =", "pretrain", ["corpus.txt", "-o", "out", "--set", "train.steps"]),
    Case(
        "invalid YAML config",
        "pretrain",
        ["corpus.txt", "-o", "out", "--config", "bad.yaml"],
        setup=write("bad.yaml", "train:\n  steps: [1, 2\n"),
    ),
    Case("config file missing", "pretrain", ["corpus.txt", "-o", "out", "--config", "none.yaml"]),
    Case("unknown preset", "pretrain", ["corpus.txt", "-o", "out", "--preset", "huge"]),
    Case("--steps 0", "pretrain", ["corpus.txt", "-o", "out", "--steps", "0"]),
    Case(
        "train.compile neither on nor off",
        "pretrain",
        ["corpus.txt", "-o", "out", "--steps", "1", "--set", "train.compile=sometimes"],
    ),
    Case("--lr negative", "pretrain", ["corpus.txt", "-o", "out", "--lr", "-1"]),
    Case("--time unreadable", "pretrain", ["corpus.txt", "-o", "out", "--time", "soon"]),
    Case("fp16 on the CPU", "pretrain", ["corpus.txt", "-o", "out", "--steps", "1", "--dtype", "fp16"]),
    Case("CUDA requested without a GPU", "pretrain", ["corpus.txt", "-o", "out", "--steps", "1", "--device", "cuda"]),
    Case(
        "global batch not shared evenly",
        "pretrain",
        ["corpus.txt", "-o", "out", "--steps", "1", "--batch-size", "4", "--global-batch-size", "16"],
        env={"WORLD_SIZE": "3", "RANK": "0"},
    ),
    Case("--out is a file", "pretrain", ["corpus.txt", "-o", "corpus.txt", "--steps", "1"]),
    Case("run directory already holds a run", "pretrain", ["corpus.txt", "-o", "run", "--steps", "1"]),
    Case("--resume from a missing checkpoint", "pretrain", ["corpus.txt", "-o", "out", "--resume", "gone/best"]),
    Case("--tokenizer that is not one", "pretrain", ["corpus.txt", "-o", "out", "--steps", "1", "--tokenizer", "."]),
    Case(
        "resume with another tokenizer",
        "pretrain",
        ["corpus.txt", "-o", "run", "--resume", "auto", "--steps", "9", "--tokenizer", "tok2", *SETS],
    ),
    Case(
        "resume with another model shape",
        "pretrain",
        ["corpus.txt", "-o", "run", "--resume", "auto", "--steps", "9", *SETS, "--set", "model.d_model=64"],
    ),
    Case("another run writes to --out", "pretrain", ["corpus.txt", "-o", "busy", "--steps", "1"], setup=live_lock),
    Case(
        "optimizer state damaged",
        "pretrain",
        ["corpus.txt", "-o", "r_opt", "--resume", "auto", "--steps", "9", *SETS],
        setup=copy_run("r_opt", break_optimizer(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")),
    ),
    Case(
        "optimizer state is a pickle",
        "pretrain",
        ["corpus.txt", "-o", "r_pkl", "--resume", "auto", "--steps", "9", *SETS],
        setup=copy_run("r_pkl", break_optimizer(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.cos\nsystem\n")),
    ),
    Case(
        "metrics.jsonl damaged mid-file",
        "pretrain",
        ["corpus.txt", "-o", "r_met", "--resume", "auto", "--steps", "9", *SETS],
        setup=copy_run("r_met", damage_metrics),
    ),
    # checkpoints, for any command that reads one
    Case("checkpoint missing", "generate", ["nowhere", "-p", "x"]),
    Case("a file given as checkpoint", "generate", ["corpus.txt", "-p", "x"]),
    Case("a directory that is no checkpoint", "generate", ["tok2", "-p", "x"]),
    Case(
        "checkpoint incomplete",
        "generate",
        ["r_inc/best", "-p", "x"],
        setup=copy_run("r_inc", drop_file("tokenizer.model")),
    ),
    Case("tokenizer swapped for another", "generate", ["r_swap", "-p", "x"], setup=copy_run("r_swap", swap_tokenizer)),
    Case("config.yaml edited to another width", "generate", ["r_wid", "-p", "x"], setup=copy_run("r_wid", edit_width)),
    Case(
        "checkpoint from a newer llmkit",
        "generate",
        ["r_new", "-p", "x"],
        setup=copy_run("r_new", newer("trainer_state.json", "format")),
    ),
    Case(
        "tokenizer from a newer llmkit",
        "generate",
        ["r_tnew", "-p", "x"],
        setup=copy_run("r_tnew", newer("tokenizer.yaml", "format")),
    ),
    # generate
    Case("--temperature negative", "generate", ["run", "-p", "x", "--temperature", "-1"]),
    Case("--temperature too small to sample", "generate", ["run", "-p", "x", "--temperature", "1e-300"]),
    Case(
        "a .zst corpus cut short",
        "pretrain",
        ["cut.txt.zst", "-o", "out", "--steps", "1"],
        setup=lambda root: (root / "cut.txt.zst").write_bytes(_zst_frames()[:-25]),
    ),
    Case(
        "a JSON-lines corpus with a lone surrogate",
        "pretrain",
        ["sur.jsonl", "-o", "out", "--steps", "1"],
        setup=write("sur.jsonl", '{"text": "\\ud800 bonjour"}\n{"text": "Le chat dort."}\n'),
    ),
    Case("--seed past 64 bits", "generate", ["run", "-p", "x", "--seed", str(10**23)]),
    Case("--length-penalty huge", "generate", ["run", "-p", "x", "--num-beams", "2", "--length-penalty", "1e308"]),
    Case("--num-beams huge", "generate", ["run", "-p", "x", "--num-beams", "100000"]),
    Case(
        "--draft-tokens huge",
        "generate",
        ["run", "-p", "x", "--greedy", "--lookup", "2", "--draft-tokens", "100000000"],
    ),
    Case("--top-p above 1", "generate", ["run", "-p", "x", "--top-p", "3"]),
    Case("--frequency-penalty nan", "generate", ["run", "-p", "x", "--frequency-penalty", "nan"]),
    Case("--max-new-tokens 0", "generate", ["run", "-p", "x", "--max-new-tokens", "0"]),
    Case("beams with sampling options", "generate", ["run", "-p", "x", "--num-beams", "2", "--temperature", "0.5"]),
    Case("empty --stop", "generate", ["run", "-p", "x", "--stop", ""]),
    Case("--prompt and --prompt-file", "generate", ["run", "-p", "x", "--prompt-file", "corpus.txt"]),
    Case("prompt file missing", "generate", ["run", "--prompt-file", "none.txt"]),
    Case(
        "prompt file empty",
        "generate",
        ["run", "--prompt-file", "empty_prompts.txt"],
        setup=write("empty_prompts.txt", "\n\n"),
    ),
    Case(
        "JSONL prompt without the field",
        "generate",
        ["run", "--prompt-file", "p.jsonl"],
        setup=write("p.jsonl", '{"text": "Bonjour"}\n'),
    ),
    Case("a classifier given to generate", "generate", ["clf", "-p", "x"]),
    Case("--quantize to an unknown format", "generate", ["run", "-p", "x", "--quantize", "int4"]),
    Case("--lookup with sampling", "generate", ["run", "-p", "x", "--lookup", "3", "--temperature", "0.8"]),
    Case(
        "--draft with penalties",
        "generate",
        ["run", "-p", "x", "--draft", "run", "--greedy", "--repetition-penalty", "1.3"],
    ),
    Case("--draft of another kind", "generate", ["run", "-p", "x", "--draft", "clf", "--greedy"]),
    Case(
        "--draft int8 on int8 weights",
        "generate",
        ["run", "-p", "x", "--draft", "int8", "--quantize", "int8", "--greedy"],
    ),
    # tokenize
    Case("tokenizer corpus missing", "tokenize", ["train", "nowhere.txt", "-o", "t"]),
    Case("vocabulary too small", "tokenize", ["train", "corpus.txt", "-o", "t", "--vocab-size", "8"]),
    Case("encode with no tokenizer", "tokenize", ["encode", "empty_dir", "Bonjour"], setup=write("empty_dir/x", "")),
    Case("decode something that is no id", "tokenize", ["decode", "run", "12", "abc"]),
    Case("decode an id out of range", "tokenize", ["decode", "run", "999999"]),
    # finetune
    Case("--task missing", "finetune", ["run", "--data", "pairs.jsonl", "-o", "ft"], setup=write("pairs.jsonl", PAIRS)),
    Case("--data missing", "finetune", ["run", "--task", "classify", "-o", "ft"]),
    Case("data file of unknown format", "finetune", ["run", "--task", "classify", "--data", "corpus.txt", "-o", "ft"]),
    Case(
        "label field missing",
        "finetune",
        ["run", "--task", "classify", "--data", "nolabel.jsonl", "-o", "ft"],
        setup=write("nolabel.jsonl", '{"text": "Bonjour"}\n'),
    ),
    Case(
        "malformed JSON line",
        "finetune",
        ["run", "--task", "classify", "--data", "broken.jsonl", "-o", "ft"],
        setup=write("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label"\n'),
    ),
    Case(
        "a single class",
        "finetune",
        ["run", "--task", "classify", "--data", "one.jsonl", "-o", "ft"],
        setup=write("one.jsonl", "\n".join(json.dumps({"text": f"t{i}", "label": "x"}) for i in range(6))),
    ),
    Case(
        "text that is a number",
        "finetune",
        ["run", "--task", "classify", "--data", "num.jsonl", "-o", "ft"],
        setup=write("num.jsonl", '{"text": 123, "label": "a"}\n'),
    ),
    Case(
        "label that is a list",
        "finetune",
        ["run", "--task", "classify", "--data", "list.jsonl", "-o", "ft"],
        setup=write("list.jsonl", '{"text": "Bonjour", "label": ["a"]}\n'),
    ),
    Case(
        "unknown role in messages",
        "finetune",
        ["run", "--task", "instruct", "--data", "roles.jsonl", "-o", "ft"],
        setup=write(
            "roles.jsonl",
            json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n",
        ),
    ),
    Case(
        "--freeze-trunk outside classify",
        "finetune",
        ["run", "--task", "translate", "--data", "pairs.jsonl", "-o", "ft", "--freeze-trunk"],
        setup=write("pairs.jsonl", PAIRS),
    ),
    Case(
        "--merge without --lora",
        "finetune",
        ["run", "--task", "translate", "--data", "pairs.jsonl", "-o", "ft", "--merge", "--steps", "1"],
        setup=write("pairs.jsonl", PAIRS),
    ),
    Case(
        "unknown LoRA target",
        "finetune",
        ["run", "--task", "translate", "--data", "pairs.jsonl", "-o", "ft", "--lora", "--lora-targets", "qkv"],
        setup=write("pairs.jsonl", PAIRS),
    ),
    Case(
        "--val with --task lm",
        "finetune",
        ["run", "--task", "lm", "--data", "corpus.txt", "--val", "corpus.txt", "-o", "ft", "--steps", "1"],
    ),
    Case(
        "--context 0",
        "finetune",
        ["run", "--task", "translate", "--data", "pairs.jsonl", "-o", "ft", "--context", "0"],
        setup=write("pairs.jsonl", PAIRS),
    ),
    Case(
        "fine-tuning that changes the network",
        "finetune",
        ["run", "--task", "translate", "--data", "pairs.jsonl", "-o", "ft", "--set", "model.n_layer=3"],
        setup=write("pairs.jsonl", PAIRS),
    ),
    Case(
        "--task other than the resumed run's",
        "finetune",
        ["run", "--task", "translate", "--data", "reviews.jsonl", "-o", "clf", "--resume", "auto"],
        setup=write("reviews.jsonl", REVIEWS),
    ),
    # classify and eval
    Case("a language model given to classify", "classify", ["run", "Bonjour"]),
    Case("texts and --input together", "classify", ["clf", "Bonjour", "--input", "corpus.txt"]),
    Case("--top-k 0", "classify", ["clf", "Bonjour", "--top-k", "0"]),
    Case("eval data missing", "eval", ["run", "nowhere.txt"]),
    Case("eval --batch-size 0", "eval", ["run", "corpus.txt", "--batch-size", "0"]),
    Case("eval --resume without --outputs", "eval", ["run", "corpus.txt", "--resume"]),
    Case(
        "eval --outputs file already there",
        "eval",
        ["run", "corpus.txt", "--outputs", "out.jsonl"],
        setup=write("out.jsonl", "{}\n"),
    ),
    # structured outputs
    Case("two structures at once", "generate", ["run", "-p", "x", "--choices", "a|b", "--regex", "[0-9]+"]),
    Case(
        "a JSON schema the engine cannot compile",
        "generate",
        ["run", "-p", "x", "--json-schema", "s.json"],
        setup=write("s.json", '{"type": "objet"}'),
    ),
    Case(
        "a schema file that is not JSON",
        "generate",
        ["run", "-p", "x", "--json-schema", "s.json"],
        setup=write("s.json", "{type: object}"),
    ),  # fmt: skip
    Case("a regular expression that does not compile", "generate", ["run", "-p", "x", "--regex", "(a"]),
    Case("a structure with beam search", "generate", ["run", "-p", "x", "--choices", "a|b", "--num-beams", "2"]),
    Case("a budget that ends inside the JSON", "generate", ["run", "-p", "x", "--json-object", "-n", "1"]),
    Case(
        "structured outputs without the grammar engine",
        "generate",
        ["run", "-p", "x", "--choices", "a|b"],
        hide=("llguidance",),
    ),  # fmt: skip
    Case("--labels with one label", "classify", ["run", "Bonjour", "--labels", "sport"]),
    Case(
        "zero-shot template without {label} at its end",
        "classify",
        ["run", "Bonjour", "--labels", "a,b", "--template", "{label} : {text}"],
    ),  # fmt: skip
    Case("--labels given to a classifier", "classify", ["clf", "Bonjour", "--labels", "a,b"]),
    # split
    *(
        Case(name, "split", ["pairs.jsonl", *args, "-o", "sp"], setup=write("pairs.jsonl", PAIRS))
        for name, args in (
            ("split --dev taking every row", ["--dev", "100"]),
            ("split --dev not a size", ["--dev", "ten"]),
            ("split --by a missing field", ["--by", "title"]),
        )
    ),
    # encode
    Case("encode input missing", "encode", ["run", "nowhere.txt", "-o", "v.npy"]),
    Case("encode output of unknown format", "encode", ["run", "corpus.txt", "-o", "v.parquet"]),
    Case("--layer out of range", "encode", ["run", "corpus.txt", "-o", "v.npy", "--layer", "7"]),
    Case(
        "a NaN among the vectors to map",
        "inspect",
        ["--embeddings", "nan.npy", "-o", "maps"],
        setup=lambda root: __import__("numpy").save(
            root / "nan.npy", __import__("numpy").array([[1.0, 0.0], [float("nan"), 1.0]])
        ),
    ),
    Case("unknown pooling", "encode", ["run", "corpus.txt", "-o", "v.npy", "--pooling", "median"]),
    Case("--query without --index", "encode", ["run", "--query", "Bonjour"]),
    Case(
        "an index another model built",
        "encode",
        ["run", "--query", "Bonjour", "--index", "clf_index.npy"],
        setup=other_model_index,
    ),
    Case(
        "--resume with other settings",
        "encode",
        ["run", "items.txt", "-o", "index.npy", "--resume", "--pooling", "last"],
        setup=index_made,
    ),
    Case("CSV input without --column", "encode", ["run", "t.csv", "-o", "v.npy"], setup=write("t.csv", "a,b\n1,2\n")),
    # pretrained models: import and export
    Case(
        "pretrained folder of an unknown architecture",
        "import",
        ["hf_neox", "-o", "imp"],
        setup=hf_copy("hf_neox", lambda c: c.update(model_type="gpt_neox")),
    ),
    Case(
        "pretrained weights that disagree with config.json",
        "import",
        ["hf_shape", "-o", "imp"],
        setup=hf_copy("hf_shape", lambda c: c.update(intermediate_size=80)),
    ),
    Case(
        "pretrained folder with a shard missing",
        "import",
        ["hf_shard", "-o", "imp"],
        setup=hf_copy("hf_shard", None, index=True),
    ),
    Case(
        "pretrained folder with pickle weights only",
        "import",
        ["hf_bin", "-o", "imp"],
        setup=hf_copy("hf_bin", None, pickle=True),
    ),
    Case(
        "a model folder's file linked outside it",
        "import",
        ["hf_link", "-o", "imp"],
        setup=hf_copy("hf_link", None, link=True),
    ),
    Case("a truncated GGUF file", "generate", ["cut.gguf", "-p", "x"], setup=truncated_gguf),
    Case(
        "a GGUF header declaring 2^40 elements",
        "generate",
        ["huge.gguf", "-p", "x"],
        setup=write(
            "huge.gguf",
            b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 4, 1 << 40),
        ),  # fmt: skip
    ),
    Case(
        "config.json sizing a model of 10^8 layers",
        "import",
        ["hf_deep", "-o", "imp"],
        setup=hf_copy("hf_deep", lambda c: c.update(num_hidden_layers=100_000_000)),
    ),
    Case("import into an existing directory", "import", ["hf", "-o", "run"]),
    Case("export to an unknown format", "export", ["run", "-o", "x", "--format", "onnx"]),
    Case("--quant with a Hugging Face export", "export", ["run", "-o", "x", "--quant", "q8_0"]),
    Case("GGUF export to a name without .gguf", "export", ["run", "-o", "model.bin", "--format", "gguf"]),
    Case("exporting a classifier", "export", ["clf", "-o", "clf_hf"]),
    Case("--chat on a model without a chat template", "generate", ["run", "-p", "x", "--chat"]),
    # usage errors: Click's own line (after the usage line), exit 2
    Case("unknown option", "generate", ["run", "--temprature", "0.5"], code=2),
    Case("missing argument", "encode", [], code=2),
    # serve
    Case("serve: a port out of range", "serve", ["run", "--port", "70000"]),
    Case("serve: a checkpoint that is not there", "serve", ["nowhere", "--port", "8123"]),
    Case("serve: --max-batch 0", "serve", ["run", "--max-batch", "0"]),
    Case("serve: the port is in use", "serve", ["run", "--port", "8124"], setup=hold_port(8124)),
]


# --- running a case ---------------------------------------------------------------------------------

VOLATILE = [
    (re.compile(r"PID \d+"), "PID …"),
    (re.compile(r"\b[0-9a-f]{12}…"), "…"),
    (re.compile(r"\b[0-9a-f]{16}\b"), "…"),
    (re.compile(r"llmkit \d+\.\d+\.\d+\S*"), "llmkit X"),
]


def normalise(message: str) -> str:
    for pattern, repl in VOLATILE:
        message = pattern.sub(repl, message)
    return message


def run_case(case: Case, root: Path) -> tuple[int, str]:
    """Run one case in ``root``; return (exit code, its message: the last line of stderr)."""
    from typer.testing import CliRunner

    from llmkit.cli.app import app

    here = os.getcwd()
    saved = {k: os.environ.get(k) for k in case.env}
    hidden = {k: sys.modules.get(k) for k in case.hide}
    os.chdir(root)
    try:
        sys.modules.update({k: None for k in case.hide})  # import then fails as for a missing package
        if case.setup:
            case.setup(root)
        os.environ.update(case.env)
        r = CliRunner().invoke(app, [case.command, *case.args])
    finally:
        os.chdir(here)
        for k, v in hidden.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    message = (lines[-1] if lines else "").replace(f"{root.resolve()}/", "").replace(f"{root}/", "")
    if sum(line.lower().startswith("error:") for line in lines) != 1:
        message = "NOT ONE ERROR LINE: " + message
    if "Traceback" in r.output:
        message = "TRACEBACK: " + r.output[-500:]
    return r.exit_code, normalise(" ".join(message.split()))


def build_world(root: Path) -> None:
    """The scratch directory the cases run in (see the module docstring)."""
    from typer.testing import CliRunner

    from llmkit.cli.app import app
    from llmkit.core.files.corpus import sample_corpus

    root.mkdir(parents=True, exist_ok=True)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sample_corpus())
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    (root / "reviews.jsonl").write_text(REVIEWS, encoding="utf-8")
    here = os.getcwd()
    os.chdir(root)
    try:
        runner = CliRunner()
        r = runner.invoke(app, ["pretrain", "corpus.txt", "-o", "run", "--steps", "2", *SETS, "-q"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(
            app,
            [
                "finetune",
                "run",
                "--task",
                "classify",
                "--data",
                "reviews.jsonl",
                "-o",
                "clf",
                "--steps",
                "2",
                *SETS,
                "-q",
            ],
        )
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["tokenize", "train", "corpus.txt", "-o", "tok2", "--vocab-size", "420"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["export", "run", "-o", "hf", "-q"])
        assert r.exit_code == 0, r.output
    finally:
        os.chdir(here)


def documented(doc: str) -> dict[str, tuple[int, str]]:
    """{case name: (exit code, message)} from the table of docs/errors.md."""
    out = {}
    for line in doc.splitlines():
        m = re.match(r"^\| (.+?) \| `llmkit ([a-z]+)(?:[^|]|\\\|)*` \| (\d) \| `(.*)` \|$", line)
        if m:
            out[m.group(1)] = (int(m.group(3)), m.group(4).replace("\\|", "|"))
    return out


def render(results: list[tuple[Case, int, str]]) -> str:
    rows = []
    for case, code, message in results:
        args = " ".join(case.args)
        args = args.replace(" ".join(SETS), "--set … (the tiny model's settings)")
        shown = args.replace("|", "\\|")
        rows.append(
            f"| {case.name} | `llmkit {case.command} {shown}` | {code} | `{message.replace('|', chr(92) + '|')}` |"
        )
    return HEADER + "\n".join(rows) + "\n" + FOOTER


HEADER = """# Errors: every bad input and its answer

Every case below is something a user can cause. Each gets **one line on stderr** that names the
file, key or flag at fault and what to do, and an exit code: **1** for a user error, **2** for a
usage error (an unknown option, a missing argument: Click's convention, with the usage line).
None prints a traceback (`LLMKIT_DEBUG=1` shows one, for bug reports). Signals have their own
codes: **130** after Ctrl-C and **143** after SIGTERM, each once the run's checkpoint is written;
**141** when the reader of stdout goes away (`| head`).

The table is written from real runs by `python tests/errors_catalog.py` and checked by
`tests/test_errors.py`, which runs every case and fails if a message differs from the one shown
here. Cases run in a scratch directory holding `corpus.txt`, a tiny pretrained run `run/` (and
`hf/`, its export as a Hugging Face folder), a classifier `clf/` and a second tokenizer `tok2/`;
parts that change from run to run (a PID, a hash, a version) are shown as `…` or `X`.

| case | command | exit | message |
|---|---|---|---|
"""

FOOTER = """
Beyond single bad inputs, the fault-injection suite (`tests/test_faults.py`, docs/reliability.md)
kills runs at random moments, fills the disk and sends signals, and checks that nothing earlier is
lost and that resumed runs end bit-identical to uninterrupted ones.
"""


def main() -> None:
    import tempfile

    os.environ.setdefault("LLMKIT_CACHE", tempfile.mkdtemp(prefix="llmkit-cache-"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "w"
        build_world(root)
        results = [(case, *run_case(case, root)) for case in CASES]
    page = HERE.parent / "docs" / "errors.md"
    page.write_text(render(results), encoding="utf-8")
    print(f"{page}: {len(results)} cases")
    for case, code, message in results:
        if code not in (1, 2) or message.startswith("TRACEBACK") or not message.startswith(("error:", "Error:")):
            print(f"  check: {case.name}: exit {code}: {message}")


if __name__ == "__main__":
    main()
