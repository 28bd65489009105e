#!/usr/bin/env bash
# The bundled French sample, step by step: tokenizer (with its report), tiny model, generation.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
OUT=${OUT:-runs/example-sample}
rm -rf "$OUT"
$LLMKIT tokenize train llmkit/sample -o "$OUT/tok" --vocab-size 2048
$LLMKIT tokenize encode "$OUT/tok" "Le pain de campagne sort du four." --pieces
$LLMKIT pretrain -o "$OUT/run" --tokenizer "$OUT/tok" --preset tiny --time 90s
$LLMKIT generate "$OUT/run" --prompt "Au marché, le fromager" --max-new-tokens 60 --seed 1
$LLMKIT generate "$OUT/run" --prompt "La langue française" --greedy --max-new-tokens 40
