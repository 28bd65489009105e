"""The two layouts of a few-row product, on a checkpoint's own weights: what ``core/few_rows.py``'s
probe measures, with more repeats, printed as a table.

    cd benchmarks && ../.venv/bin/python few_rows_bench.py CKPT [CKPT ...] [--repeats 5]

For each row count, one pass multiplies that many random rows by every linear weight of the model
once (as a decoding step does), with ``F.linear`` (x @ W.T, what torch and transformers use) and
with the transposed layout ((W @ x.T).T, one row padded to two); the fastest of --repeats passes
each, interleaved. `taken` is what the probe would decide for that row count (10% margin; counts
above the largest probed one, 16, always keep F.linear).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import emit, machine

from llmkit.core.checkpoint import load_model
from llmkit.core.few_rows import MARGIN, PROBED_ROWS, FewRowLinear, transposed_linear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    emit(event="machine", **machine())
    for path in args.checkpoints:
        model, _ = load_model(path)
        weights = list({id(m.weight): m.weight.detach() for m in model.modules() if isinstance(m, FewRowLinear)}.values())
        mb = sum(w.numel() for w in weights) * 4 / 2**20
        with torch.inference_mode():
            for rows in (*PROBED_ROWS, 64):  # and one count past the probed ones, for the record
                inputs = {w.size(1): torch.randn(rows, w.size(1)) for w in weights}
                best = {"linear": math.inf, "transposed": math.inf}
                for _ in range(args.repeats):
                    for name, product in (("linear", F.linear), ("transposed", transposed_linear)):
                        t0 = time.perf_counter()
                        for w in weights:
                            product(inputs[w.size(1)], w, None)
                        best[name] = min(best[name], time.perf_counter() - t0)
                emit(event="few_rows", model=path.name, weights_mb=round(mb, 1), rows=rows,
                     linear_ms=round(best["linear"] * 1e3, 2), transposed_ms=round(best["transposed"] * 1e3, 2),
                     speedup=round(best["linear"] / best["transposed"], 2),
                     taken=rows <= PROBED_ROWS[-1] and best["transposed"] * MARGIN < best["linear"])


if __name__ == "__main__":
    main()
