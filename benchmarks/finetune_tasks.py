"""`llmkit finetune` on the shared French task data: classification, translation, question answering.

    .venv/bin/python benchmarks/finetune_tasks.py CKPT [--only classify,translate,instruct] [--work DIR]
        [--steps N --batch B] [--set KEY=VALUE ...]

CKPT is a pretrained checkpoint, a Hugging Face folder, a .gguf or a registry model's name
(``gemma3-270m``, ``smollm2-135m``); docs/benchmarks.md gives each figure's exact command.

Every llmkit run is the real command in its own process: wall time and peak RSS come from wait4.
Only dev splits are scored; the test splits stay untouched.

- classify (theatre17_genre_fr, sib200_topic_fr): full fine-tuning and LoRA, scored on dev by
  `llmkit eval`, beside the majority class and a bag-of-words logistic regression fitted here.
- translate (translate_fr_en): train on ntrex128 plus tico19_dev minus 200 held-out pairs; chrF and
  BLEU of greedy translations of those 200, by `llmkit eval`. One epoch, or ``--steps`` steps of
  ``--batch`` pairs (what a pretrained base with a large vocabulary can afford on a CPU).
- instruct (instruct_fr/piaf_qa_fr): question + context -> answer; 10% of the articles (by title)
  held out; exact match and token F1 of greedy answers on 200 of their questions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import ROOT, SHARED_DATA, bag_of_words, emit, logistic_probe, machine, peak_of, read_classify

LLMKIT = [sys.executable, "-m", "llmkit"]
EXTRA: list[str] = []  # --set flags every fine-tuning run gets (e.g. train.threads from --threads)
BUDGET: list[str] = ["--epochs", "1"]  # translate and instruct: one epoch, or --steps/--batch
BASE: dict[str, str] = {}  # which base and settings every result row names (run_all.py's bases table)


def run(args: list[str]) -> tuple[float, float]:
    out = Path(args[args.index("--out") + 1])
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    seconds, peak = peak_of(LLMKIT + args + EXTRA)
    return round(seconds, 1), round(peak)


def evaluate(ckpt: Path, data: Path, *extra: str) -> dict:
    out = subprocess.run(
        LLMKIT + ["eval", str(ckpt), str(data), "--json", "--quiet", *extra], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(out.stderr)
    report = json.loads(out.stdout)
    report.pop("outputs", None)
    return report


def trained(out: Path) -> dict:
    last = json.loads((out / "last" / "trainer_state.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": last["step"], "best_step": last["best_step"], "evals": sum(r["event"] == "eval" for r in rows)}


def params_line(out: Path) -> dict:
    state = json.loads((out / "best" / "trainer_state.json").read_text())
    return {"params": state["params"], "trainable": state["trainable"]}


CLASSIFY_SETS = (("sib200_topic_fr", "6", "25"), ("theatre17_genre_fr", "1", "50"))


def classify(ckpt: str, work: Path, sets: tuple[str, ...] = (), methods: tuple[str, ...] = ("full", "lora")) -> None:
    # Budgets in epochs, not time: the figures do not depend on how busy the machine was.
    for name, epochs, every in CLASSIFY_SETS:
        if sets and name not in sets:
            continue
        train = SHARED_DATA / "classify_fr" / f"{name}.train.jsonl"
        dev = SHARED_DATA / "classify_fr" / f"{name}.dev.jsonl"
        (xtr_t, ytr), (xdv_t, ydv) = read_classify(name, "train"), read_classify(name, "dev")
        majority = Counter(ytr).most_common(1)[0][0]
        emit(
            **BASE,
            task="classify",
            data=name,
            method="majority",
            accuracy=round(sum(y == majority for y in ydv) / len(ydv), 4),
        )
        xtr, xdv = bag_of_words(xtr_t, xdv_t)
        emit(**BASE, task="classify", data=name, method="bag-of-words logreg", **logistic_probe(xtr, ytr, xdv, ydv))
        for method, extra in (("full", []), ("lora", ["--lora"])):
            if method not in methods:
                continue
            out = work / f"{name}-{method}"
            seconds, peak = run(
                [
                    "finetune",
                    ckpt,
                    "--task",
                    "classify",
                    "--data",
                    str(train),
                    "--val",
                    str(dev),
                    "--out",
                    str(out),
                    "--epochs",
                    epochs,
                    "--quiet",
                    *extra,
                    "--set",
                    f"train.eval_every={every}",
                    "--set",
                    "train.patience=6",
                ]
            )
            report = evaluate(out / "best", dev)
            emit(
                **BASE,
                task="classify",
                data=name,
                method=f"llmkit {method}",
                accuracy=round(report["accuracy"], 4),
                macro_f1=round(report["macro_f1"], 4),
                seconds=seconds,
                peak_rss_mb=peak,
                **trained(out),
                **params_line(out),
            )


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ZERO_SHOT = "Translate this French text into English. Answer with the translation only.\n\n{src}"


def _chat_model(ckpt: str) -> bool:
    from llmkit.core.interop.resolve import open_checkpoint

    return bool(open_checkpoint(Path(ckpt)).tokenizer.chat_template)


def zero_shot(ckpt: str, dev: list[dict]) -> dict:
    """Greedy answers of a chat model to a plain instruction, one conversation per source sentence."""
    prompts = "".join(json.dumps({"prompt": ZERO_SHOT.format(src=r["src"])}, ensure_ascii=False) + "\n" for r in dev)
    t0 = time.perf_counter()
    out = subprocess.run(
        LLMKIT + ["generate", ckpt, "--chat", "--greedy", "-n", "96", "--json", "--quiet"],
        input=prompts,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        sys.exit(out.stderr)
    hyps = [json.loads(line)["text"].strip() for line in out.stdout.splitlines()]
    return {**_scores(hyps, [r["tgt"] for r in dev]), "seconds": round(time.perf_counter() - t0, 1)}


def translate(ckpt: str, work: Path) -> None:
    root = SHARED_DATA / "translate_fr_en"
    tico = [json.loads(line) for line in (root / "tico19_dev.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(tico)
    dev, rest = tico[:200], tico[200:]
    ntrex = [json.loads(line) for line in (root / "ntrex128.jsonl").read_text().splitlines()]
    chat = _chat_model(ckpt)
    train = _jsonl(work / "translate.train.jsonl", [{"src": r["src"], "tgt": r["tgt"]} for r in ntrex + rest])
    dev_file = _jsonl(work / "translate.dev.jsonl", [{"src": r["src"], "tgt": r["tgt"]} for r in dev])
    emit(
        **BASE,
        task="translate",
        data="translate_fr_en",
        method="copy source (baseline)",
        **_scores([r["src"] for r in dev], [r["tgt"] for r in dev]),
    )
    if chat:  # a chat model is asked in its own format, zero-shot, then fine-tuned in that format
        emit(
            **BASE,
            task="translate",
            data="translate_fr_en",
            method="llmkit zero-shot (chat)",
            examples=len(dev),
            **zero_shot(ckpt, dev),
        )
    out = work / "translate-full"
    seconds, peak = run(
        [
            "finetune",
            ckpt,
            "--task",
            "translate",
            "--data",
            str(train),
            "--val",
            str(dev_file),
            "--out",
            str(out),
            *BUDGET,
            "--quiet",
            "--set",
            "train.eval_every=100",
            "--set",
            "task.eval_limit=50",
            # A chat model reads the instruction it is asked zero-shot, in its own format, when
            # fine-tuned too: the template carries it, the data stays plain pairs.
            *(["--template", "chat:" + ZERO_SHOT.format(src="{prompt}")] if chat else []),
        ]
    )
    report = evaluate(out / "best", dev_file)
    emit(
        **BASE,
        task="translate",
        data="translate_fr_en",
        method="llmkit full",
        chrf=round(report["chrf"], 2),
        bleu=round(report["bleu"], 2),
        examples=report["examples"],
        seconds=seconds,
        peak_rss_mb=peak,
        **trained(out),
        **params_line(out),
    )


def _scores(hyps: list[str], refs: list[str]) -> dict:
    from llmkit.core.tasks.metrics import bleu, chrf

    return {"chrf": round(chrf(hyps, refs), 2), "bleu": round(bleu(hyps, refs), 2)}


def instruct(ckpt: str, work: Path) -> None:
    rows = [json.loads(line) for line in (SHARED_DATA / "instruct_fr" / "piaf_qa_fr.jsonl").read_text().splitlines()]
    held = lambda r: int(hashlib.sha256(r["title"].encode()).hexdigest(), 16) % 10 == 0  # noqa: E731
    as_pair = lambda r: {"prompt": f"{r['context']}\n\nQuestion : {r['question']}", "response": r["answer"]}  # noqa: E731
    train = _jsonl(work / "qa.train.jsonl", [as_pair(r) for r in rows if not held(r)])
    dev_rows = [r for r in rows if held(r)]
    random.Random(0).shuffle(dev_rows)
    dev = _jsonl(work / "qa.dev.jsonl", [as_pair(r) for r in dev_rows[:200]])
    titles = len({r["title"] for r in dev_rows})
    out = work / "qa-full"
    seconds, peak = run(
        [
            "finetune",
            ckpt,
            "--task",
            "instruct",
            "--data",
            str(train),
            "--val",
            str(dev),
            "--out",
            str(out),
            *BUDGET,
            "--quiet",
            "--set",
            "train.eval_every=100",
            "--set",
            "task.max_new_tokens=32",
            "--set",
            "task.eval_limit=50",  # validation while training decodes 50 answers; eval below scores all 200
        ]
    )
    report = evaluate(out / "best", dev)
    emit(
        **BASE,
        task="instruct",
        data="piaf_qa_fr",
        method="llmkit full",
        held_out_articles=titles,
        exact_match=round(report["exact_match"], 2),
        token_f1=round(report["token_f1"], 2),
        examples=report["examples"],
        truncated=report["truncated"],
        seconds=seconds,
        peak_rss_mb=peak,
        **trained(out),
        **params_line(out),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--only", default="classify,translate,instruct")
    parser.add_argument("--work", default=str(ROOT / ".bench" / "finetune"))
    parser.add_argument("--sets", default="", help="classify: only these data sets (comma-separated)")
    parser.add_argument("--methods", default="full,lora", help="classify: full and/or lora")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of each run (0: llmkit's choice)")
    parser.add_argument("--steps", type=int, default=0, help="translate, instruct: steps instead of one epoch")
    parser.add_argument("--batch", type=int, default=0, help="translate, instruct: examples per step")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every fine-tuning run")
    parser.add_argument("--label", default="", help="the base's name in the rows (default: CKPT's name)")
    args = parser.parse_args()
    if args.threads:
        EXTRA.extend(["--set", f"train.threads={args.threads}"])
    for item in args.set:
        EXTRA.extend(["--set", item])
    if args.steps:
        BUDGET[:] = ["--steps", str(args.steps)]
    if args.batch:
        BUDGET.extend(["--set", f"train.batch_size={args.batch}"])
    if not SHARED_DATA.exists():
        sys.exit(f"skipped: {SHARED_DATA} not present")
    work = Path(args.work).resolve()  # the runs start in the repository root
    work.mkdir(parents=True, exist_ok=True)
    emit(event="machine", **machine())
    BASE["base"] = args.label or Path(args.checkpoint).name
    budget = [f"--steps {args.steps}"] * bool(args.steps) + [f"--batch {args.batch}"] * bool(args.batch)
    BASE["settings"] = " ".join([*budget, *args.set])
    given = Path(args.checkpoint)
    # a checkpoint, a Hugging Face folder or a .gguf; otherwise a registry model's name, as the CLI takes it
    ckpt = str(given.resolve()) if given.exists() else args.checkpoint
    for name in args.only.split(","):
        if name == "classify":
            classify(ckpt, work, tuple(filter(None, args.sets.split(","))), tuple(args.methods.split(",")))
        else:
            {"translate": translate, "instruct": instruct}[name](ckpt, work)


if __name__ == "__main__":
    main()
