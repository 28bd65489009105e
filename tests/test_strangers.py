"""Files made by strangers (model folders, GGUF files, templates) cannot reach outside what they
were given, nor make llmkit use the wrong model silently (issue: hostile inputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETS, need_module

from llmkit.core.errors import CheckpointError
from llmkit.core.interop.folder import member
from llmkit.core.interop.resolve import import_model
from llmkit.core.interop.tokenizer_io import write_hf_tokenizer

SECRET = "root:x:0:0:secret-line-that-must-not-travel\n"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer):
    transformers = need_module("transformers", "writing a Hugging Face folder")
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("stranger") / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    write_hf_tokenizer(tokenizer, folder, context=64)
    return folder


def _copy(folder, dest):
    dest.mkdir()
    for p in folder.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_a_chat_template_linked_outside_the_folder_is_refused(hf_folder, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text(SECRET)
    folder = _copy(hf_folder, tmp_path / "hf")
    (folder / "chat_template.jinja").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        import_model(folder, tmp_path / "imp")
    assert not (tmp_path / "imp").exists()


def test_a_shard_named_outside_the_folder_is_refused(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "hf")
    (tmp_path / "elsewhere.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        import_model(folder, tmp_path / "imp")


def test_links_inside_the_folder_and_a_hugging_face_cache_snapshot_are_followed(tmp_path):
    folder = tmp_path / "hf"
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "chat.jinja").write_text("{{ messages }}")
    (folder / "chat_template.jinja").symlink_to("templates/chat.jinja")
    assert member(folder, "chat_template.jinja") == folder / "chat_template.jinja"
    repo = tmp_path / "models--x--y"  # ~/.cache/huggingface/hub's layout: snapshots link into blobs
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("{}")
    os.symlink("../../blobs/f00d", repo / "snapshots" / "abc" / "config.json")
    assert member(repo / "snapshots" / "abc", "config.json") is not None
    assert member(folder, "missing.json") is None
    with pytest.raises(CheckpointError, match="outside"):
        member(folder, "/etc/passwd")


def run_cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMKIT_CACHE": str(tmp / "cache")}
    return subprocess.run([str(Path(sys.executable).parent / "llmkit"), *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def test_the_cli_says_so_in_one_line(hf_folder, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text(SECRET)
    folder = _copy(hf_folder, tmp_path / "hf")
    (folder / "chat_template.jinja").symlink_to(secret)
    r = run_cli("import", str(folder), "-o", str(tmp_path / "imp"), tmp=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "outside the model folder" in r.stderr
    assert "secret-line" not in r.stdout + r.stderr


@pytest.mark.parametrize(
    "field",
    [
        {"temperature": 1e-300},
        {"seed": 10**23},
        {"repetition_penalty": 1e308},
        {"presence_penalty": 1e30},
        {"top_k": 10**12},
        {"max_tokens": 10**9},
    ],  # fmt: skip
    ids=lambda f: next(iter(f)),
)
def test_a_request_out_of_range_is_its_own_400_and_the_next_one_is_served(trained_run, field):
    need_module("fastapi", "the HTTP server")
    from fastapi.testclient import TestClient

    from llmkit.serve.api import Server, create_app

    with TestClient(create_app(Server(trained_run))) as http:
        bad = http.post("/v1/completions", json={"prompt": "Le pain", "max_tokens": 4, **field})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["type"] == "invalid_request_error"
        good = http.post("/v1/completions", json={"prompt": "Le pain", "max_tokens": 4, "temperature": 0})
        assert good.status_code == 200 and good.json()["choices"][0]["text"] is not None


@pytest.mark.parametrize(
    "flag",
    [
        ["--temperature", "1e-300"],
        ["--seed", str(10**23)],
        ["--length-penalty", "1e308"],
        ["--num-beams", "100000"],
        ["--draft-tokens", "100000000", "--lookup", "2", "--greedy"],
    ],  # fmt: skip
    ids=lambda f: f[0],
)
def test_a_flag_out_of_range_is_one_line_before_any_work(trained_run, tmp_path, flag):
    r = run_cli("generate", str(trained_run), "-p", "Le", "-n", "2", *flag, tmp=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "must be" in r.stderr, r.stderr


def test_two_models_of_one_name_size_and_time_are_two_cache_entries(trained_run, tmp_path, monkeypatch):
    """The import cache was keyed by name, size and mtime: the second file got the first's model."""
    gguf = need_module("gguf", "GGUF files")
    from llmkit.core.interop.export import export
    from llmkit.core.interop.resolve import open_model
    from llmkit.core.store.checkpoint import read_checkpoint

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    a.parent.mkdir(), b.parent.mkdir()
    export(read_checkpoint(trained_run), a, format="gguf", quant="f32")
    raw = bytearray(a.read_bytes())
    norm = next(t for t in gguf.GGUFReader(a).tensors if t.name == "output_norm.weight")
    values = torch.frombuffer(raw[norm.data_offset : norm.data_offset + 4 * norm.n_elements], dtype=torch.float32)
    raw[norm.data_offset : norm.data_offset + 4 * norm.n_elements] = (values * 3).numpy().tobytes()
    b.write_bytes(bytes(raw))
    stamp = a.stat().st_mtime_ns
    os.utime(b, ns=(stamp, stamp))
    assert a.stat().st_size == b.stat().st_size and a.stat().st_mtime_ns == b.stat().st_mtime_ns
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        la, lb = open_model(a)[0](x), open_model(b)[0](x)
        assert not torch.allclose(la, lb)
        assert torch.equal(open_model(a)[0](x), la)  # the second use of a: the same entry, no new import
    assert len([p for p in (tmp_path / "cache" / "imported").iterdir() if p.name.startswith("model-")]) == 2


def test_concurrent_first_uses_wait_for_one_import(trained_run, tmp_path):
    need_module("gguf", "GGUF files")
    from llmkit.core.interop.export import export
    from llmkit.core.store.checkpoint import read_checkpoint

    src = tmp_path / "m.gguf"
    export(read_checkpoint(trained_run), src, format="gguf", quant="f32")
    exe = str(Path(sys.executable).parent / "llmkit")
    env = {**os.environ, "LLMKIT_CACHE": str(tmp_path / "cache")}
    args = [exe, "generate", str(src), "-p", "Le", "-n", "2", "--greedy", "-q"]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    assert len({o for o, _ in outs}) == 1
    assert len([p for p in (tmp_path / "cache" / "imported").iterdir() if p.name.startswith("m-")]) == 1


def _frames(texts: list[str]) -> bytes:
    zstandard = need_module("zstandard", ".zst corpora")
    return b"".join(zstandard.ZstdCompressor().compress(t.encode()) for t in texts)


def test_every_frame_of_a_zst_corpus_is_read(tmp_path):
    from llmkit.core.files.corpus import resolve_files
    from llmkit.core.files.stream import decompressed_size

    texts = ["première trame\n" * 300, "deuxième trame\n" * 300]
    (tmp_path / "c.txt.zst").write_bytes(_frames(texts))
    cf = resolve_files([str(tmp_path / "c.txt.zst")])[0]
    assert decompressed_size(cf) == sum(len(t.encode()) for t in texts)


def test_a_truncated_multi_frame_zst_is_refused_not_half_read(tmp_path):
    """zstandard's reader stopped at the cut without an error: training went on with half the text."""
    data = _frames(["première trame du corpus\n" * 400, "deuxième trame du corpus\n" * 400])
    (tmp_path / "cut.txt.zst").write_bytes(data[:-25])
    r = run_cli("pretrain", str(tmp_path / "cut.txt.zst"), "--steps", "1", "-o", str(tmp_path / "out"), tmp=tmp_path)
    assert r.returncode == 1 and "truncated" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_symlinked_alias_of_a_run_takes_the_same_lock(tmp_path):
    """The lock was keyed by the path given: two runs wrote one directory through an alias."""
    from llmkit.core.errors import ConfigError
    from llmkit.core.store.lock import run_lock
    from llmkit.core.training.distributed import Dist

    (tmp_path / "runs" / "real").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "runs" / "real")
    with run_lock(tmp_path / "runs" / "real", Dist()):
        with pytest.raises(ConfigError, match="another llmkit run"):
            with run_lock(tmp_path / "alias", Dist()):
                pass


def test_last_is_a_link_to_the_newest_step_not_a_second_copy(tmp_path, corpus_file):
    """last/ and step-N/ were hard links: damaging one damaged both, and the message said to resume
    from "an earlier one"."""
    sets = [
        a for s in [*TINY_SETS, "train.save_every=2", "train.samples=0", "train.report=false"] for a in ("--set", s)
    ]
    r = run_cli("pretrain", str(corpus_file), "-o", str(tmp_path / "r"), "--steps", "4", *sets, "-q", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    last = tmp_path / "r" / "last"
    assert last.is_symlink() and last.resolve() == (tmp_path / "r" / "step-000004").resolve()
    (last / "optimizer.safetensors").write_bytes(b"damaged")
    r = run_cli("pretrain", str(corpus_file), "-o", str(tmp_path / "r"), "--resume", "auto", "--steps", "6",
                "-q", tmp=tmp_path)  # fmt: skip
    assert r.returncode == 1 and "step-000004" in r.stderr and "is damaged" in r.stderr, r.stderr
    earlier = tmp_path / "r" / "step-000002"
    r = run_cli("pretrain", str(corpus_file), "-o", str(tmp_path / "r"), "--resume", str(earlier), "--steps", "6",
                "-q", tmp=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_an_export_that_fails_midway_leaves_nothing_at_its_name(trained_run, tmp_path, monkeypatch, fmt):
    """A killed or disk-full export left a torn file at the final name (then "already exists")."""
    gguf = need_module("gguf", "GGUF files")
    import errno

    from llmkit.core.errors import ConfigError
    from llmkit.core.interop import hf
    from llmkit.core.interop.export import export
    from llmkit.core.store.checkpoint import read_checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = (gguf.GGUFWriter, "write_tensors_to_file") if fmt == "gguf" else (hf, "write_json")
    monkeypatch.setattr(*target, full)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m-hf")
    with pytest.raises(ConfigError, match="No space left on device; nothing was written there"):
        export(read_checkpoint(trained_run), out, format=fmt, quant="f32" if fmt == "gguf" else "f16")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export(read_checkpoint(trained_run), out, format=fmt, **({"quant": "f32"} if fmt == "gguf" else {}))
    assert out.exists()
    if fmt == "hf":
        modes = {oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
        assert len(modes) == 1, modes  # model.safetensors was 0600 beside 0644 files


def _gguf_header(tensors: int, kvs: list[bytes]) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs)


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("huge array", _gguf_header(0, [_kv("a", 9, __import__("struct").pack("<IQ", 4, 1 << 40))]), "elements"),
        ("huge string", _gguf_header(0, [_kv("s", 8, __import__("struct").pack("<Q", 1 << 50))]), "string"),
        ("many keys", b"GGUF" + __import__("struct").pack("<IQQ", 3, 0, 1 << 40), "keys"),
        ("many tensors", b"GGUF" + __import__("struct").pack("<IQQ", 3, 1 << 40, 0), "tensors"),
        ("cut header", _gguf_header(0, [_kv("x", 4, b"\x01")]), "more than the file holds"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_a_crafted_gguf_header_is_refused_before_any_allocation(tmp_path, name, data, message):
    """An 84-byte GGUF declaring a 2^40-element array grew memory at ~50 MB/s until killed."""
    from llmkit.core.interop.gguf_io import check_header

    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        check_header(path)
    assert message in str(e.value), e.value
    r = run_cli("generate", str(path), "-p", "x", tmp=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("change", [{"num_hidden_layers": 100_000_000}, {"max_position_embeddings": 1 << 40},
                                    {"hidden_size": 1 << 30}, {"vocab_size": 1 << 40}])  # fmt: skip
def test_a_config_json_sizing_a_huge_model_is_refused_in_one_line(hf_folder, tmp_path, change):
    folder = _copy(hf_folder, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    r = run_cli("import", str(folder), "-o", str(tmp_path / "imp"), tmp=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "at most" in r.stderr, r.stderr


def test_cross_site_and_rebinding_requests_are_told_apart_from_the_servers_own():
    need_module("fastapi", "the HTTP server")
    from llmkit.serve.api import LOOPBACK, cross_site

    assert cross_site("127.0.0.1:8000", None, LOOPBACK) == ""  # a program on this machine
    assert cross_site("127.0.0.1:8000", "http://127.0.0.1:8000", LOOPBACK) == ""  # the chat page itself
    assert cross_site("localhost:8000", "http://localhost:8000", LOOPBACK) == ""
    assert cross_site("[::1]:8000", None, LOOPBACK) == ""
    assert "Host" in cross_site("rebind.evil.example:8000", "http://rebind.evil.example:8000", LOOPBACK)
    assert "web page" in cross_site("127.0.0.1:8000", "https://evil.example", LOOPBACK)
    assert "web page" in cross_site("lab.local:8000", "https://evil.example", None)  # beyond loopback too
    assert cross_site("lab.local:8000", "http://lab.local:8000", None) == ""


class _Tok:
    bos_id, eos_id = 0, 1

    def __init__(self, template: str):
        self.chat_template = template

    def id_to_piece(self, i: int) -> str:
        return "<s>" if i == 0 else "</s>"


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "to render"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}", "writes"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ ().__class__.__base__.__subclasses__() }}", "refused this conversation"),
    ],
    ids=["loop", "output", "recursion", "division", "escape"],
)
def test_a_chat_template_renders_under_a_time_and_size_limit(template, message):
    """A template that looped froze the whole server (its health check, its SIGTERM)."""
    need_module("jinja2", "chat templates")
    import time

    from llmkit.core.errors import DataError
    from llmkit.core.text import templates

    start = time.monotonic()
    with pytest.raises(DataError, match=message):
        templates.render(_Tok(template), [("user", "Bonjour")])
    assert time.monotonic() - start < templates.RENDER_SECONDS + 1.0
    assert templates.render(_Tok("{{ messages[0]['content'] }}!"), [("user", "Bonjour")]) == "Bonjour!"


def test_inputs_that_gave_tracebacks_are_one_line(trained_run, tmp_path):
    """Each of these ended in a Python traceback."""
    import numpy as np

    (tmp_path / "c.jsonl").write_text('{"text": "\\ud800 bonjour"}\n{"text": "Le chat dort sur le canapé."}\n')
    np.save(tmp_path / "nan.npy", np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 1.0]], dtype="f4"))
    cases = [
        (["pretrain", str(tmp_path / "c.jsonl"), "--steps", "1", "-o", str(tmp_path / "o")], None, "lone surrogate"),
        (["generate", str(trained_run), "-p", "\udcff\udcfe", "-n", "2"], None, "not valid UTF-8"),
        (["generate", str(trained_run), "-n", "2"], b"\xff\xfe\n", "not valid UTF-8"),
        (["inspect", "--embeddings", str(tmp_path / "nan.npy"), "-o", str(tmp_path / "i")], None, "NaN"),
    ]
    for args, stdin, phrase in cases:
        env = {**os.environ, "LLMKIT_CACHE": str(tmp_path / "cache")}
        exe = str(Path(sys.executable).parent / "llmkit")
        r = subprocess.run([exe, *args], input=stdin, capture_output=True, env=env, timeout=300)
        err = r.stderr.decode("utf-8", "replace")
        last = err.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith("error:") and phrase in last and "Traceback" not in err, (
            args,
            err,
        )
        assert r.stdout == b"", (args, r.stdout)


def test_a_csv_field_over_128_kib_is_read(tmp_path):
    from llmkit.core.files.records import iter_rows

    long = "mot " * 50_000  # 200 KB: Python's csv module refuses fields over 128 KiB by default
    rows = list(iter_rows(["text,label", f'"{long}",x'], "big.csv", "csv", column="text"))
    assert rows[0][1]["text"] == long


def test_a_damaged_reports_json_costs_its_section_not_the_page(tmp_path):
    from llmkit.core.jobs.report import render

    (tmp_path / "reports.json").write_text('{"data": [1')
    assert "reports.json cannot be read" in render(tmp_path)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": "\\ud800"}',
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
    ],  # fmt: skip
    ids=["deep", "surrogate", "content-part"],
)
def test_request_bodies_that_gave_500s_are_400s(trained_run, body):
    need_module("fastapi", "the HTTP server")
    from fastapi.testclient import TestClient

    from llmkit.serve.api import Server, create_app

    route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    with TestClient(create_app(Server(trained_run))) as http:
        r = http.post(route, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert http.post("/v1/completions", json={"prompt": "Le", "max_tokens": 2}).status_code == 200


def test_a_compressed_line_of_gigabytes_is_refused_before_it_is_held(tmp_path, monkeypatch):
    """A 2 MB .txt.gz holding one 2 GiB line was read into memory whole."""
    import gzip

    from llmkit.core.errors import DataError
    from llmkit.core.files import stream
    from llmkit.core.files.corpus import resolve_files

    monkeypatch.setattr(stream, "LINE_BYTES", 4 << 20)  # the same rule at a size a test can afford
    with gzip.open(tmp_path / "one.txt.gz", "wb") as f:
        for _ in range(16):
            f.write(b"a" * (1 << 20))  # 16 MiB, no line break, 16 KB compressed
    cf = resolve_files([str(tmp_path / "one.txt.gz")])[0]
    with pytest.raises(DataError, match="over 4 MiB"):
        with stream.open_raw(cf.path) as raw:
            reader = stream.HashingReader(raw, cf.path)
            with stream._decompressed(reader, cf) as s:
                list(stream.line_chunks(s, 1 << 20, cf.path))


def test_a_huge_config_json_is_not_read_into_memory(tmp_path):
    from llmkit.core.interop.folder import member

    folder = tmp_path / "hf"
    folder.mkdir()
    with open(folder / "config.json", "wb") as f:  # sparse: 1 GiB that takes no disk
        f.truncate(1 << 30)
    with pytest.raises(CheckpointError, match="over the 256 MiB"):
        member(folder, "config.json")


def test_encode_onto_a_full_disk_is_one_line_not_sigbus(trained_run, tmp_path, monkeypatch):
    """The .npy output was written through a memory map into a sparse file: a full disk killed
    encode with SIGBUS and no message."""
    import errno

    from llmkit.core.config import EmbedConfig
    from llmkit.core.errors import DataError
    from llmkit.core.jobs import embed
    from llmkit.core.store.checkpoint import load_model

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embed.os, "posix_fallocate", full)
    model, ckpt = load_model(trained_run)
    items = embed.ItemSource.from_text("un\ndeux\ntrois\n", "stdin").scan()
    with pytest.raises(DataError, match="No space left on device"):
        embed.encode_to_file(model, ckpt.tokenizer, items, tmp_path / "v.npy", EmbedConfig(), model_id="x")
    assert not (tmp_path / "v.npy").exists()


def test_cors_is_off_unless_asked_and_then_only_for_the_origins_named(trained_run):
    need_module("fastapi", "the HTTP server")
    from fastapi.testclient import TestClient

    from llmkit.serve.api import Server, create_app

    body = {"prompt": "Le", "max_tokens": 2}
    with TestClient(create_app(Server(trained_run))) as http:
        r = http.post("/v1/completions", json=body, headers={"Origin": "https://app.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    with TestClient(create_app(Server(trained_run, cors_origins=("https://app.example",)))) as http:
        pre = http.options("/v1/completions", headers={"Origin": "https://app.example",
                                                         "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "content-type"})  # fmt: skip
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        r = http.post("/v1/completions", json=body, headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert http.post("/v1/completions", json=body, headers={"Origin": "https://evil.example"}).status_code == 403
