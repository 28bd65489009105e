"""`llmkit serve` under load, on loopback only, with bounded loops.

    .venv/bin/python benchmarks/serve_load.py [--requests 64] [--tokens 32] [--clients 1,4,16,64]

A `small`-shaped model (its weights after one pretraining step: throughput does not depend on what
it learned, and greedy decoding then runs the full length) is served twice: with batching
(`--max-batch 16`) and one request at a time (`--max-batch 1`). For each number of concurrent
clients the same fixed set of requests (greedy, `max_tokens` each, streamed so the first token's
time is seen) is sent; every request is counted as answered or refused (4xx/503), none is lost.
Beside them, `transformers` `generate()` on the same weights, one prompt after another.
One JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, emit, hf_llama, machine

LLMKIT = [sys.executable, "-m", "llmkit"]
PROMPTS = [
    "La ville de",
    "Le pain",
    "Au printemps,",
    "La mer",
    "Il était une fois",
    "Le français",
    "Dans la cuisine",
    "Les oiseaux",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(ckpt: Path, max_batch: int):
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        LLMKIT
        + [
            "serve",
            str(ckpt),
            "--port",
            str(port),
            "--quiet",
            "--max-batch",
            str(max_batch),
            "--max-concurrent",
            "256",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("the server did not start: " + proc.stderr.read())


def load(url: str, clients: int, requests: int, tokens: int) -> dict:
    """``requests`` streamed greedy completions from ``clients`` threads at once."""
    import httpx

    jobs = list(range(requests))
    lock = threading.Lock()
    latencies, ttfts, statuses, produced = [], [], {}, [0]

    def worker():
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    if not jobs:
                        return
                    i = jobs.pop()
                body = {
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                t0, first, n = time.perf_counter(), None, 0
                with http.stream("POST", url + "/v1/completions", json=body) as r:
                    status = r.status_code
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            status = 503
                            break
                        if chunk.get("usage"):
                            n = chunk["usage"]["completion_tokens"]
                            continue
                        if chunk["choices"][0]["text"] and first is None:
                            first = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(time.perf_counter() - t0)
                        ttfts.append(first or 0.0)
                        produced[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "tokens_per_s": round(produced[0] / wall, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p99_latency_s": round(q[98], 3),
        "p50_ttft_s": round(statistics.median(ttfts), 3),
        "answered": statuses.get(200, 0),
        "refused": sum(v for k, v in statuses.items() if k != 200),
        "lost": requests - sum(statuses.values()),
        "wall_s": round(wall, 1),
    }


def transformers_sequential(ckpt: Path, requests: int, tokens: int) -> dict:
    import torch

    from llmkit.core.interop.resolve import open_model

    model, c = open_model(ckpt)
    hf = hf_llama(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(requests):
            ids = torch.tensor([c.tokenizer.encode(PROMPTS[i % len(PROMPTS)])])
            hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - t0
    return {"tokens_per_s": round(requests * tokens / wall, 1), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--work", default=str(ROOT / ".bench" / "serve"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    emit(event="machine", **machine())
    run = work / "small"
    if not (run / "best").is_dir():
        shutil.rmtree(run, ignore_errors=True)
        subprocess.run(
            LLMKIT
            + [
                "pretrain",
                "--preset",
                "small",
                "--steps",
                "1",
                "-o",
                str(run),
                "--quiet",
                "--set",
                "train.samples=0",
                "--set",
                "train.eval_batches=1",
            ],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    ckpt = run / "best"
    for max_batch in (16, 1):
        proc, url = start(ckpt, max_batch)
        try:
            load(url, 4, 8, args.tokens)  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                emit(
                    server=f"llmkit serve --max-batch {max_batch}",
                    clients=clients,
                    requests=args.requests,
                    max_tokens=args.tokens,
                    **load(url, clients, args.requests, args.tokens),
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    emit(
        server="transformers generate(), one request after another",
        clients=1,
        requests=args.requests,
        max_tokens=args.tokens,
        **transformers_sequential(ckpt, args.requests, args.tokens),
    )


if __name__ == "__main__":
    main()
