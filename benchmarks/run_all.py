"""Run the speed benchmarks and rewrite their tables in docs/benchmarks.md.

    cd benchmarks && ../.venv/bin/python run_all.py
                        [--only startup,loop,loop_avx2,step,decode,rows,precision,bases,levers]
                                                    [--target CKPT --draft CKPT] [--rows-models CKPT,CKPT]
                                                    [--loop-seconds 60] [--dry-run]

Each section runs its script in a child process (one JSON line per result), renders a markdown
table, and replaces the text between ``<!-- run_all:NAME -->`` and ``<!-- /run_all:NAME -->`` in
docs/benchmarks.md, headed by the machine it ran on (CPU model, cores, flags, torch) and the
command. Sections without their inputs (``decode`` needs --target, ``rows`` --rows-models,
``bases`` and ``levers`` the saved runs of finetune_tasks.py and levers.py) are left as they were,
and say so. ``--dry-run`` prints the tables instead of writing them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from common import ROOT, emit, machine

DOC = ROOT / "docs" / "benchmarks.md"
PY = sys.executable
HERE = Path(__file__).resolve().parent


def rows_of(cmd: list[str]) -> list[dict]:
    out = subprocess.run(cmd, cwd=HERE, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def header(m: dict, command: str) -> str:
    """The machine and command a table came from (a saved run's own machine line when there is one)."""
    flags = ", ".join(m["cpu_flags"]) or "none of avx2/avx512/amx"
    if m.get("kernels"):
        flags += f"; kernels {m['kernels']}"
    return (
        f"Measured {date.today().isoformat()} on {m['cpu']} ({m['cores']} core(s); {flags}), torch {m['torch']}, "
        f"Python {m['python']}, {m['threads']} thread(s). Command: `{command}`.\n\n"
    )


def ran_on(m: dict, rows: list[dict]) -> dict:
    """The machine line of the rows (a saved run's), over this machine's for what it lacks."""
    return {**m, **next((r for r in rows if r.get("event") == "machine"), {})}


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def startup(args, m) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "t"
        subprocess.run(
            [
                PY,
                "-m",
                "llmkit",
                "pretrain",
                "llmkit/sample",
                "--preset",
                "tiny",
                "--steps",
                "20",
                "-o",
                str(run),
                "-q",
                "--set",
                "train.samples=0",
            ],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cases = {
            "`python -c 'import torch'` (the floor)": [PY, "-c", "import torch"],
            "`llmkit --help`": [PY, "-m", "llmkit", "--help"],
            "`llmkit generate CKPT -p Le -n 1 -q` (tiny model)": [
                PY,
                "-m",
                "llmkit",
                "generate",
                str(run),
                "-p",
                "Le",
                "-n",
                "1",
                "-q",
            ],
        }
        times = {k: [] for k in cases}
        for _ in range(args.repeat):
            for k, cmd in cases.items():
                t0 = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                times[k].append(time.perf_counter() - t0)
    return header(m, "run_all.py --only startup") + table(
        ["command", f"median of {args.repeat} (s)"], [[k, f"{statistics.median(v):.2f}"] for k, v in times.items()]
    )


def saved_or_run(args, name: str, cmd: list[str]) -> list[dict]:
    """The JSON lines of a section's script: read from ``--from NAME=FILE`` (a saved run), or run now."""
    saved = dict(item.split("=", 1) for item in args.saved)
    if name in saved:
        return [json.loads(line) for line in Path(saved[name]).read_text().splitlines() if line.startswith("{")]
    return rows_of(cmd)


def loop(args, m, isa: str | None = None) -> str:
    cmd = [
        PY,
        "train_loop.py",
        "--shapes",
        args.loop_shapes,
        "--seconds",
        str(args.loop_seconds),
        "--rounds",
        str(args.rounds),
        *(["--isa", isa] if isa else []),
    ]
    every = saved_or_run(args, f"loop_{isa}" if isa else "loop", cmd)
    m, rows = ran_on(m, every), [r for r in every if r.get("event") == "train_loop"]
    body = [
        [
            r["shape"],
            r["mode"],
            f"{r['llmkit_bare']:,}",
            f"{r['llmkit_loop']:,}",
            f"**{r['loop_vs_bare']:.3f}**",
            f"{r['nanogpt_bare']:,}",
            f"{r['nanogpt_loop']:,}",
            f"**{r['loop_vs_nanogpt_loop']:.2f}**",
        ]
        for r in rows
    ]
    return header(m, " ".join(["train_loop.py", *cmd[2:]])) + table(
        [
            "shape",
            "llmkit mode (probe)",
            "llmkit bare step tok/s",
            "llmkit loop tok/s",
            "loop / bare",
            "nanoGPT bare tok/s",
            "nanoGPT loop tok/s",
            "llmkit loop / nanoGPT loop",
        ],
        body,
    )


def step(args, m) -> str:
    cmd = [PY, "train_throughput.py", "--rounds", str(args.rounds * 4), "--bf16"]
    every = saved_or_run(args, "step", cmd)
    m, rows = ran_on(m, every), [r for r in every if r.get("event") == "train_step"]
    body = [[r["shape"], r["contender"], f"{r['tokens_per_s']:,}", f"{r['ratio_vs_transformers']:.2f}"] for r in rows]
    return header(m, " ".join(["train_throughput.py", *cmd[2:]])) + table(
        ["shape", "contender", "tokens/s", "vs transformers fp32"], body
    )


def decode(args, m) -> str | None:
    if not args.target and not any(item.startswith("decode=") for item in args.saved):
        return None
    cmd = [PY, "decode_fast.py", str(args.target), "--rounds", str(args.rounds)]
    if args.draft:
        cmd += ["--draft", str(args.draft)]
    rows = saved_or_run(args, "decode", cmd)
    m = ran_on(m, rows)
    body = [
        [
            r["batch"],
            r["contender"],
            f"{r['new_tokens_per_s']:,}",
            f"**{r['ratio_vs_transformers']:.2f}**",
            r["output"],
            "" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
        ]
        for r in rows
        if r.get("event") == "decode"
    ]
    ppl = next(r for r in rows if r.get("event") == "int8_perplexity")
    note = (
        f"\nint8 perplexity on {ppl['text_tokens']:,} tokens of held-out French: {ppl['fp32']} (fp32) → "
        f"{ppl['int8']} (int8), {ppl['change_pct']:+.2f}%.\n"
    )
    return (
        header(m, " ".join(["decode_fast.py", *cmd[2:]]))
        + table(["batch", "contender", "new tokens/s", "vs transformers", "output", "guesses accepted"], body)
        + note
    )


def rows(args, m) -> str | None:
    if not args.rows_models and not any(item.startswith("rows=") for item in args.saved):
        return None
    cmd = [PY, "few_rows_bench.py", *(args.rows_models or "").split(",")]
    every = saved_or_run(args, "rows", cmd)
    m = ran_on(m, every)
    body = [
        [
            r["model"],
            f"{r['weights_mb']:,}",
            r["rows"],
            r["linear_ms"],
            r["transposed_ms"],
            f"**{r['speedup']:.2f}**",
            "yes" if r["taken"] and r["rows"] <= 16 else "no",
        ]
        for r in every
        if r.get("event") == "few_rows"
    ]
    return header(m, " ".join(["few_rows_bench.py", *cmd[2:]])) + table(
        ["model", "linear weights (MB)", "rows", "x @ W.T (ms)", "(W @ x.T).T (ms)", "speed-up", "taken"], body
    )


def loop_avx2(args, m) -> str:
    """The loop section again with torch's kernels capped to AVX2: an AVX2-only machine's code."""
    return loop(args, m, "avx2")


def precision(args, m) -> str:
    """fp32 against bf16 products and a training step on this CPU (precision.py, seconds)."""
    cmd = [PY, "precision.py", "--rounds", str(args.rounds)]
    rows = saved_or_run(args, "precision", cmd)
    mm = [r for r in rows if r.get("event") == "matmul"]
    step_row = next(r for r in rows if r.get("event") == "train_step_tiny")
    lines = [[f"matmul {r['n']}×{r['n']}", f"{r['fp32_gflops']:.1f} GFLOP/s", f"{r['bf16_gflops']:.1f} GFLOP/s",
              f"{r['bf16_speedup']:.3g}×"] for r in mm]  # fmt: skip
    lines.append([f"`tiny` forward+backward, batch {step_row['batch']} × {step_row['context']}",
                  f"{step_row['fp32_s']:.4f} s", f"{step_row['bf16_autocast_s']:.4f} s (autocast)",
                  f"{step_row['bf16_speedup']:.3g}×"])  # fmt: skip
    note = f"\nThe speed probe's choice for this shape here: **{step_row['auto_choice']}**.\n"
    return (header(ran_on(m, rows), f"run_all.py --only precision --rounds {args.rounds}")
            + table(["measurement", "fp32", "bf16", "bf16 speed-up"], lines) + note)  # fmt: skip


def _score(r: dict) -> str:
    if "accuracy" in r:
        return f"accuracy {r['accuracy']:.3f}" + (f", macro-F1 {r['macro_f1']:.3f}" if "macro_f1" in r else "")
    if "chrf" in r:
        return f"chrF {r['chrf']:.1f}, BLEU {r['bleu']:.1f}"
    return f"exact match {r['exact_match']:.1f}, token F1 {r['token_f1']:.1f}"


def bases(args, m) -> str | None:
    """The French tasks by pretrained base, from saved finetune_tasks.py runs (``--from bases=A,B``:
    hours of CPU each, so never run from here): the baselines once, then each base's fine-tunes."""
    files = [f for item in args.saved if item.startswith("bases=") for f in item.split("=", 1)[1].split(",")]
    if not files:
        return None
    every = []
    for item in files:  # FILE, or BASE:FILE for rows saved before finetune_tasks.py named their base
        base, _, name = item.rpartition(":")
        rows = [json.loads(line) for line in Path(name).read_text().splitlines() if line.startswith("{")]
        every += [{"base": base, **r} if base and "task" in r else r for r in rows]
    results = [r for r in every if "task" in r]
    plain = ("majority", "bag-of-words logreg", "copy source (baseline)")
    seen, lines = set(), []
    for r in results:
        if r["method"] in plain:
            if (r["data"], r["method"]) not in seen:
                seen.add((r["data"], r["method"]))
                lines.append(["—", r["data"], r["method"], _score(r), "", "", "", ""])
            continue
        steps = f"{r['steps']} ({r['best_step']})" if "steps" in r else ""
        trainable = f"{r['trainable'] / 1e6:.1f}M" if "trainable" in r else ""
        lines.append([r.get("base", "?"), r["data"], r["method"] + (f" `{r['settings']}`" if r.get("settings") else ""),
                      _score(r), steps, trainable, f"{r['seconds']:,.0f} s" if "seconds" in r else "",
                      f"{r['peak_rss_mb']:,.0f} MB" if "peak_rss_mb" in r else ""])  # fmt: skip
    command = "run_all.py --only bases --from bases=" + ",".join(files)
    head = ["base", "data (dev split)", "method", "scores", "steps (best)", "trained", "time", "peak RSS"]
    return header(ran_on(m, every), command) + table(head, lines)


def levers_on() -> list[str]:
    """The recipe's adopted levers as --set options (core/training/recipe.py's LEVERS)."""
    from llmkit.core.training.recipe import LEVERS

    return [f"{s}.{k}={v}" for s, values in LEVERS.items() for k, v in values.items()]


def levers(args, m) -> str | None:
    """The speedrun's levers against the budget-sized recipe, from saved levers.py runs (``--from
    levers=A,B``, one file per corpus and budget: half an hour to hours each, never run from here)."""
    files = [f for item in args.saved if item.startswith("levers=") for f in item.split("=", 1)[1].split(",")]
    if not files:
        return None
    every, lines = [], []
    for name in files:
        rows = [json.loads(line) for line in Path(name).read_text().splitlines() if line.startswith("{")]
        every += rows
        for r in (r for r in rows if r.get("event") == "nanogpt"):  # recipe_vs_nanogpt.py --nanogpt-only
            ng = r["nanogpt"]
            lines.append([f"{r['corpus']}, {r['budget']}", "nanoGPT (1)", "its CPU recipe: 4 × 128, context 64, chars",
                          f"{ng['val_bpb']:.3f}", "", f"{ng['tokens_per_s']:,}", ""])  # fmt: skip
        for r in (r for r in rows if r.get("event") == "lever"):
            sets = " ".join(f"`{s}`" for s in r["sets"]) or {
                "base": "the recipe before its levers: AdamW, cosine, SwiGLU",
                "recipe": "the recipe as llmkit runs it: " + " ".join(f"`{s}`" for s in levers_on()),
            }.get(r["lever"], "")
            delta = "" if r["lever"] == "base" or r["delta_bpb"] is None else f"{r['delta_bpb']:+.3f}"
            ratio = f" ({r['speed_ratio']:.2f}x)" if r["speed_ratio"] is not None else ""
            spread = f" ± {r['val_bpb_spread'] / 2:.3f}" if r["seeds"] > 1 else ""
            lines.append([f"{r['corpus']}, {r['budget']}", f"{r['lever']} ({r['seeds']})", sets,
                          f"{r['val_bpb']:.3f}{spread}", delta,
                          f"{r['tokens_per_s']:,}{ratio}", ", ".join(r["shape"])])  # fmt: skip
    command = "run_all.py --only levers --from levers=" + ",".join(files)
    runs = [f"`{r['command']}`" for r in every if r.get("event") == "machine" and r.get("command")]
    head = ["corpus, budget", "lever (seeds)", "options, on top of base", "bits/byte (± half the spread)",
            "vs base", "tokens/s", "shape"]  # fmt: skip
    return header(ran_on(m, every), command) + table(head, lines) + "\nThe runs: " + "; ".join(runs) + ".\n"


SECTIONS = {"startup": startup, "loop": loop, "loop_avx2": loop_avx2, "step": step, "decode": decode, "rows": rows,
            "precision": precision, "bases": bases, "levers": levers}  # fmt: skip


def replace(doc: str, name: str, text: str) -> str:
    start, end = f"<!-- run_all:{name} -->", f"<!-- /run_all:{name} -->"
    if start not in doc or end not in doc:
        raise SystemExit(f"docs/benchmarks.md has no {start} … {end} markers")
    before, rest = doc.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{text}{end}{after}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SECTIONS))  # bases renders only from --from bases=FILES
    ap.add_argument("--target", type=Path, help="decode: the checkpoint to decode (e.g. a small model you trained)")
    ap.add_argument("--draft", type=Path, help="decode: a smaller checkpoint with the same tokenizer")
    ap.add_argument("--rows-models", help="rows: checkpoints whose few-row products to time, comma-separated")
    ap.add_argument("--loop-shapes", default="nano,small")
    ap.add_argument("--loop-seconds", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="startup: runs of each command")
    ap.add_argument(
        "--from",
        dest="saved",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="render section NAME from the saved JSON lines of an earlier run of its script",
    )
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    m = machine()
    emit(event="machine", **m)
    doc = DOC.read_text(encoding="utf-8")
    for name in args.only.split(","):
        text = SECTIONS[name](args, m)
        if text is None:
            emit(event="section", name=name, left="as it was (its inputs were not given)")
            continue
        if args.dry_run:
            print(f"--- {name}\n{text}")
        doc = replace(doc, name, text)
        emit(event="section", name=name, written=not args.dry_run)
    if not args.dry_run:
        DOC.write_text(doc, encoding="utf-8")


if __name__ == "__main__":
    main()
