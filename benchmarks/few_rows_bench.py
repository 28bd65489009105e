"""The two layouts of a few-row product, on a checkpoint's own weights: what ``core/model/few_rows.py``'s
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
from pathlib import Path

import torch
import torch.nn.functional as F
from common import emit, machine

from llmkit.core.interop.resolve import open_model
from llmkit.core.model import few_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    emit(event="machine", **machine())
    for path in args.checkpoints:
        model, _ = open_model(path)
        weights = few_rows.linear_weights(model)
        mb = sum(w.numel() for w in weights) * 4 / 2**20
        with torch.inference_mode():
            for rows in (*few_rows.PROBED_ROWS, 64):  # and one count past the probed ones, for the record
                linear, transposed = few_rows.pass_seconds(
                    weights, rows, (F.linear, few_rows.transposed_linear), args.repeats
                )
                emit(
                    event="few_rows",
                    model=path.name,
                    weights_mb=round(mb, 1),
                    rows=rows,
                    linear_ms=round(linear * 1e3, 2),
                    transposed_ms=round(transposed * 1e3, 2),
                    speedup=round(linear / transposed, 2),
                    taken=rows <= few_rows.PROBED_ROWS[-1] and transposed * few_rows.MARGIN < linear,
                )


if __name__ == "__main__":
    main()
