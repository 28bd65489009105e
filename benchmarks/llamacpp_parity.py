"""llama.cpp runs what llmkit exports: the same greedy tokens from an exported GGUF.

    pip install llama-cpp-python        # builds llama.cpp from the registry's source package (~10 min)
    .venv/bin/python benchmarks/llamacpp_parity.py [--new 32]

For an llmkit-trained model (the tiny preset, 300 steps on the bundled French sample, SentencePiece
tokenizer) and for the shared SmolLM2-135M-Instruct GGUF imported by llmkit (byte-level BPE), each
exported by `llmkit export --format gguf` in f32 and f16: llama.cpp tokenizes the prompts itself
(compared with llmkit's ids), then both decode greedily from the same ids and the tokens are
compared. One JSON line per (model, quantisation, prompt).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from common import ROOT, emit

LLMKIT = [sys.executable, "-m", "llmkit"]
SMOL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "La ville de",
    "Il était une fois, dans un village de Provence,",
    "Le chat dort sur le canapé. L'été 2024, à 14h30 :",
]


def llmkit_greedy(ckpt: Path, ids: list[int], new: int) -> list[int]:
    from llmkit.core.config import SampleConfig
    from llmkit.core.decoding.steps import decode_batch
    from llmkit.core.interop.resolve import open_model

    model, c = open_model(ckpt, "cpu")
    out = decode_batch(
        model,
        [ids],
        SampleConfig(max_new_tokens=new, temperature=0.0),
        eos_id=None,
        decode=c.tokenizer.decode,
        device="cpu",
    )
    return list(out[0].ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--work", default=str(ROOT / ".bench" / "llamacpp"))
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("skipped: llama-cpp-python is not installed (pip install llama-cpp-python builds it)")
    from llmkit.core.interop.resolve import open_checkpoint

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    emit(event="machine", llama_cpp_python=llama_cpp.__version__)
    models = {}
    trained = work / "tiny-sample"
    if not (trained / "best").is_dir():
        shutil.rmtree(trained, ignore_errors=True)
        subprocess.run(
            LLMKIT + ["pretrain", "--preset", "tiny", "--steps", "300", "-o", str(trained), "--quiet"],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    models["llmkit tiny (SentencePiece)"] = trained / "best"
    if SMOL.is_file():
        smol = work / "smollm2"
        if not (smol / "model.safetensors").is_file():
            subprocess.run(
                LLMKIT + ["import", str(SMOL), "-o", str(smol)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL
            )
        models["SmolLM2-135M-Instruct (byte-level BPE)"] = smol
    for name, ckpt in models.items():
        tok = open_checkpoint(ckpt).tokenizer
        for quant in ("f32", "f16"):
            gguf = work / f"{ckpt.parent.name if ckpt.name == 'best' else ckpt.name}-{quant}.gguf"
            gguf.unlink(missing_ok=True)
            subprocess.run(
                LLMKIT + ["export", str(ckpt), "-o", str(gguf), "--format", "gguf", "--quant", quant],
                cwd=ROOT,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False)
            for prompt in PROMPTS:
                ids = ([tok.bos_id] if tok.contract.get("add_bos") else []) + tok.encode(prompt)
                theirs_ids = llm.tokenize(
                    prompt.encode("utf-8"), add_bos=bool(tok.contract.get("add_bos")), special=False
                )
                llm.reset()
                theirs = []
                for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                    theirs.append(int(t))
                    if len(theirs) == args.new:
                        break
                ours = llmkit_greedy(ckpt, ids, args.new)
                same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                emit(
                    model=name,
                    quant=quant,
                    prompt=prompt,
                    tokenizer_ids_equal=theirs_ids == ids,
                    greedy_tokens_equal=ours == theirs,
                    agreeing_prefix=same,
                    tokens=len(ours),
                    text=tok.decode(ours),
                )
            del llm


if __name__ == "__main__":
    main()
